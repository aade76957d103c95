"""The Detect tab: COCO object boxes drawn on an uploaded image, a score slider, a table and a JSON download.

Handlers are module-level functions on plain values so tests call them without a server; the model work lives
in `VisionService`. Moving the slider re-filters the last result instead of running the model again. The
events run with `preprocess=False` so that every upload, even a broken one, reaches `open_image` and its
clear `ImageError` instead of failing inside gradio's own image decoding with a generic error.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from demo.ui import check_number, image_source, public_message, user_errors
from demo.vision_tasks import DetectionResult, VisionService, WeightsStatus
from finetune.checkpoint import write_json
from finetune.disk import prune_folder
from finetune.images import ImageSource

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
RESULT_TTL_S = 900  # the last result (the input and every candidate box) is freed 15 minutes after its run
TABLE_HEADERS = ["label", "score", "x0", "y0", "x1", "y1"]
MAX_DOWNLOADS = 200  # JSON files kept in the temporary folder; older ones are deleted
DOWNLOAD_DIR = Path(tempfile.gettempdir()) / "studio-detections"


def build(vision: VisionService) -> None:
    """Create the tab's components and wire its events; called inside `with gr.Tab(...)` by app.py."""
    gr.Markdown(status_markdown(vision.weights_status("detector")), elem_id="detect-status")
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="detect-image")
            threshold = gr.Slider(
                vision.min_score,
                1.0,
                value=DEFAULT_THRESHOLD,
                step=0.01,
                label="Score threshold",
                elem_id="detect-threshold",
            )
            button = gr.Button("Detect objects", variant="primary", elem_id="detect-button")
        with gr.Column():
            annotated = gr.Image(
                type="pil", label="Detections", interactive=False, elem_id="detect-annotated"
            )
            table = gr.Dataframe(
                headers=TABLE_HEADERS, label="Detections", interactive=False, elem_id="detect-table"
            )
            download = gr.File(label="Detections as JSON", interactive=False, elem_id="detect-json")
    result = gr.State(time_to_live=RESULT_TTL_S)
    outputs = [annotated, table, download, result]
    button.click(
        partial(detect, vision),
        [image, threshold],
        outputs,
        api_name="detect",
        preprocess=False,
        concurrency_limit=1,  # one detection at a time; demo/admission.py caps how many wait
        concurrency_id="detect",
    )
    threshold.release(
        rethreshold, [result, threshold], outputs, api_name="detect_threshold", api_visibility="private"
    )


def detect(
    vision: VisionService, image: ImageSource | dict[str, Any] | None, threshold: float
) -> tuple[Image.Image, list[list[Any]], str, DetectionResult]:
    """Run the detector: annotated image, table rows, JSON file path, and the result kept for the slider."""
    with user_errors():
        threshold = check_number("threshold", threshold, vision.min_score, 1.0)
        return _outputs(vision.detect(image_source(image)[0], threshold))


def rethreshold(
    result: DetectionResult | None, threshold: float
) -> tuple[Image.Image, list[list[Any]], str, DetectionResult] | dict[str, Any]:
    """Re-filter the last result at a new threshold without running the model; before any run, skip."""
    if result is None:
        return gr.skip()
    with user_errors():
        return _outputs(result.with_threshold(threshold))


def table_rows(result: DetectionResult) -> list[list[Any]]:
    """One row per kept detection, in `TABLE_HEADERS` order, rounded for reading."""
    return [
        [detection.label, round(detection.score, 3), *(round(value, 1) for value in detection.box)]
        for detection in result.detections
    ]


def status_markdown(status: WeightsStatus) -> str:
    """The line above the tab: where the weights come from, or exactly what to do when there are none."""
    logger.info("Detect tab: %s", status.message)  # the operator's log keeps the paths
    if status.is_available:
        return f"Finds and labels common objects (COCO classes). {public_message(status.message)}"
    return f"**Detection is unavailable:** {public_message(status.message)}"


def write_download(result: DetectionResult) -> str:
    """The result as a JSON file, named by its content so repeated clicks reuse one file."""
    data = result.as_dict()
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]
    path = DOWNLOAD_DIR / f"detections-{digest}.json"
    if not path.is_file():
        write_json(path, data)
        prune_folder(DOWNLOAD_DIR, max_entries=MAX_DOWNLOADS)  # a long-running Space must not fill its disk
    return str(path)


def _outputs(result: DetectionResult) -> tuple[Image.Image, list[list[Any]], str, DetectionResult]:
    return result.image, table_rows(result), write_download(result), result
