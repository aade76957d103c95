"""How a training job is shown: the progress bar, the epoch table, the curves and the closing note.

Shared by the Train tab (`demo.train_tab`) and the Teach tab's Train button (`demo.teach_actions`); every
text that comes from a run or an upload is escaped here, so neither tab can forget it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd
from PIL import Image

from demo.training_status import QUEUED, JobStatus
from demo.ui import public_message
from finetune.reports import CURVES_PNG
from finetune.safe_text import escape_html, escape_markdown

EPOCH_COLUMNS = ["epoch", "phase", "train loss", "train acc", "val loss", "val top-1", "seconds"]


def render_progress(status: JobStatus) -> str:
    """The progress bar and one line saying where the run is (queue position, phase, epoch, loss)."""
    percent = round(100 * status.progress)
    parts = [status.state.capitalize()]
    if status.state == QUEUED:
        parts.append(f"{status.queue_position} ahead in the queue")
    elif status.phase == "finetune" and status.epochs and not status.is_finished:
        parts.append(f"fine-tuning epoch {status.epoch}/{status.epochs}")
        if status.steps:
            parts.append(f"step {status.step}/{status.steps}")
    elif status.phase == "probe" and not status.is_finished:
        parts.append("linear probe")
    if "loss" in status.step_metrics and not status.is_finished:
        parts.append(f"loss {status.step_metrics['loss']:.3f}")
    parts += [f"{percent}%", f"{status.elapsed_s:.0f} s"]
    detail = public_message(status.error or status.message)
    return (
        f'<div class="train-progress" data-state="{status.state}" data-progress="{percent}">'
        f'<div style="background:#e5e7eb;border-radius:6px;height:14px;overflow:hidden">'
        f'<div style="width:{percent}%;height:14px;background:#6366f1;transition:width 0.5s"></div></div>'
        f"<p><b>{escape_html(' · '.join(parts))}</b><br>{escape_html(detail)}</p></div>"
    )


def epoch_table(history: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per finished epoch; epoch 0 is the linear probe."""
    rows = [
        [
            row.get("epoch"),
            row.get("phase"),
            _rounded(row.get("train_loss")),
            _rounded(row.get("train_acc")),
            _rounded(row.get("val_loss")),
            _rounded(row.get("val_top1")),
            _rounded(row.get("time_s"), 1),
        ]
        for row in history
    ]
    return pd.DataFrame(rows, columns=EPOCH_COLUMNS)


def curves_image(status: JobStatus) -> Image.Image | None:
    """The engine's curves.png of the run (rewritten after each epoch), as a picture the browser can get."""
    path = status.run_dir / CURVES_PNG if status.run_dir else None
    if path is None or not path.is_file():
        return None
    with Image.open(path) as image:
        return image.copy()


def result_note(status: JobStatus, metrics: dict[str, Any]) -> str:
    """What happened, the validation score and how to use the model."""
    if not status.has_model:
        detail = escape_markdown(public_message(status.error or status.message))
        return f"**{status.state.capitalize()}.** {detail}"
    score, what = status.metrics.get("val_top1"), "top-1"
    if score is None and status.metrics.get("val_map") is not None:  # a multi-label run (labels.csv)
        score, what = status.metrics["val_map"], "mAP"
    lines = [
        f"**{escape_markdown(status.message)}.** Validation {what} of the kept model: **{score:.1%}** "
        f"(epoch {status.metrics.get('best_epoch')}, {status.metrics.get('strategy_used')}).",
        f"The model **{status.run_id}** is now in the **Model** menu above: pick it there to use it in "
        "Classify, Explain and Batch. Download the run folder below.",
    ]
    if metrics.get("dataset"):
        lines.append(escape_markdown(metrics["dataset"]))  # class and file names from the upload
    return "  \n".join(lines)


def _rounded(value: Any, digits: int = 4) -> Any:
    return round(value, digits) if isinstance(value, float) else value
