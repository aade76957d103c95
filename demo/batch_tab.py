"""The Batch tab: many files in, one table row per file (top-1, confidence, top-k or the error), and a CSV.

Its event is the app's `batch` API: files -> (table, CSV file). A file that is not a usable image becomes a
row that says why, never a silent skip and never a failed request.
"""

from __future__ import annotations

import tempfile
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from demo.service import BatchRow, InferenceService
from demo.ui import public_message, uploaded_paths, user_errors
from finetune.disk import prune_folder
from finetune.safe_text import csv_safe_cell

# ood_score: higher = further from the model's classes; unknown: none of them (empty when rejection is off)
COLUMNS = ["file", "top-1", "confidence", "top-k", "error", "ood_score", "unknown"]
MULTILABEL_COLUMN = "labels"
TOP_K = 5
OUTPUT_ROOT = Path(tempfile.gettempdir()) / "image-recognition-studio-batch"
KEEP_OUTPUTS_S = 3600  # CSVs older than this are deleted (Gradio has copied them into its cache by then)


def classify_files(
    service: InferenceService, files: list[str] | None, model: str | None = None
) -> tuple[pd.DataFrame, str]:
    """The table of predictions by the session's `model` for `files` and the same table as a CSV file."""
    with user_errors():
        rows = service.predict_batch(uploaded_paths(files), k=TOP_K, model=model)
    table = to_table(rows)
    return table, write_csv(table)


def to_table(rows: list[BatchRow]) -> pd.DataFrame:
    """Rows in `COLUMNS` order, for both the on-screen table and the CSV (a multi-label model adds
    `labels`: every label above its threshold)."""
    table = pd.DataFrame(
        [
            [row.file, row.top1, row.confidence, row.top_k, public_message(row.error)]
            + [row.ood_score, row.unknown]
            for row in rows
        ],
        columns=COLUMNS,
    )
    if any(row.labels is not None for row in rows):
        table[MULTILABEL_COLUMN] = [row.labels or "" for row in rows]
    return table


def write_csv(table: pd.DataFrame) -> str:
    """Write `predictions.csv` in a fresh folder (a readable download name), pruning old folders."""
    OUTPUT_ROOT.mkdir(parents=True, exist_ok=True)
    prune_folder(OUTPUT_ROOT, max_age_s=KEEP_OUTPUTS_S)  # demo/disk_limits.py also bounds its size
    path = Path(tempfile.mkdtemp(prefix="batch-", dir=OUTPUT_ROOT)) / "predictions.csv"
    safe = table.apply(lambda column: column.map(csv_safe_cell))  # "=HYPERLINK(...)" names stay text
    safe.to_csv(path, index=False)
    return str(path)


def build(service: InferenceService, model: gr.State | None = None) -> None:
    """Create the tab's components and wire its `batch` event."""
    with gr.Row():
        with gr.Column(scale=1):
            files = gr.File(
                label="Images (JPEG, PNG, WebP, BMP, GIF, TIFF)", file_count="multiple", elem_id="batch-files"
            )
            button = gr.Button("Classify all", variant="primary", elem_id="batch-button")
            csv = gr.File(label="CSV", interactive=False, elem_id="batch-csv")
        with gr.Column(scale=2):
            table = gr.Dataframe(
                headers=COLUMNS,
                label=f"Predictions (top-{TOP_K})",
                interactive=False,
                wrap=True,
                column_widths=["15%", "13%", "10%", "30%", "16%", "8%", "8%"],
                max_height=900,
                elem_id="batch-table",
            )
    button.click(
        partial(classify_files, service),
        inputs=[files, *([model] if model else [])],
        outputs=[table, csv],
        api_name="batch",
        concurrency_limit=1,
        concurrency_id="batch",
    )
