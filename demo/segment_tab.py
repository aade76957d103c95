"""The Segment tab: a colour overlay of the PASCAL VOC classes, an opacity slider and a pixel-share legend.

Handlers are module-level functions on plain values so tests call them without a server; the model work lives
in `VisionService`. Moving the opacity slider redraws the last mask instead of running the model again. Like
the Detect tab, the event skips gradio's preprocessing so every upload reaches `open_image`.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import gradio as gr
from PIL import Image

from demo.ui import check_number, image_source, public_message, user_errors
from demo.vision_tasks import SegmentationResult, VisionService, WeightsStatus
from finetune.images import ImageSource
from finetune.safe_text import escape_html

logger = logging.getLogger(__name__)

DEFAULT_OPACITY = 0.6
RESULT_TTL_S = 900  # the last result (the input and its mask) is freed 15 minutes after its run


def build(vision: VisionService) -> None:
    """Create the tab's components and wire its events; called inside `with gr.Tab(...)` by app.py."""
    gr.Markdown(status_markdown(vision.weights_status("segmenter")), elem_id="segment-status")
    with gr.Row():
        with gr.Column():
            image = gr.Image(type="filepath", image_mode=None, label="Image", elem_id="segment-image")
            opacity = gr.Slider(
                0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Mask opacity", elem_id="segment-opacity"
            )
            button = gr.Button("Segment", variant="primary", elem_id="segment-button")
        with gr.Column():
            overlay = gr.Image(type="pil", label="Segmentation", interactive=False, elem_id="segment-overlay")
            legend = gr.HTML(label="Classes present", elem_id="segment-legend")
    result = gr.State(time_to_live=RESULT_TTL_S)
    button.click(
        partial(segment, vision),
        [image, opacity],
        [overlay, legend, result],
        api_name="segment",
        preprocess=False,
        concurrency_limit=1,  # one segmentation at a time; demo/admission.py caps how many wait
        concurrency_id="segment",
    )
    opacity.release(
        recolor, [result, opacity], [overlay], api_name="segment_opacity", api_visibility="private"
    )


def segment(
    vision: VisionService, image: ImageSource | dict[str, Any] | None, opacity: float
) -> tuple[Image.Image, str, SegmentationResult]:
    """Run the segmenter: overlay, legend HTML, and the result kept for the opacity slider."""
    with user_errors():
        opacity = check_number("opacity", opacity, 0.0, 1.0)
        result = vision.segment(image_source(image)[0])
        return result.overlay(opacity), legend_html(result), result


def recolor(result: SegmentationResult | None, opacity: float) -> Image.Image | Any:
    """Redraw the last mask at a new opacity; nothing to do before a run."""
    if result is None:
        return gr.skip()
    with user_errors():
        return result.overlay(opacity)


def legend_html(result: SegmentationResult) -> str:
    """A swatch, the class name and its share of the pixels for every class present, largest first."""
    rows = "".join(
        f'<li><span style="display:inline-block;width:1em;height:1em;margin-right:0.5em;'
        f'vertical-align:middle;border:1px solid #888;background:rgb{share.color}"></span>'
        f"{escape_html(share.label)}: {share.share * 100:.1f}%</li>"
        for share in result.legend
    )
    return f'<ul style="list-style:none;padding:0;margin:0">{rows}</ul>'


def status_markdown(status: WeightsStatus) -> str:
    """The line above the tab: where the weights come from, or exactly what to do when there are none."""
    logger.info("Segment tab: %s", status.message)  # the operator's log keeps the paths
    if status.is_available:
        return f"Colours every pixel by class (the 20 PASCAL VOC classes). {public_message(status.message)}"
    return f"**Segmentation is unavailable:** {public_message(status.message)}"
