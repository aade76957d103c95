"""The Explain tab: where the model looks, as Grad-CAM heatmaps over the photo, single-scale and multi-scale.

Its event is the app's `explain` API: (image, class name or "" for the predicted one, opacity) ->
(single-scale overlay, multi-scale overlay, caption). Moving the opacity slider re-blends the stored maps
without running the model again.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import gradio as gr
from PIL import Image

from demo.cam import overlay
from demo.classify_tab import IMAGE_SOURCES, example_images
from demo.model_picker import ModelView
from demo.service import Explanation, InferenceService
from demo.ui import check_number, check_text, image_source, user_errors
from finetune.safe_text import escape_markdown

PREDICTED = ""  # the class choice that means "whatever the model predicts"
DEFAULT_OPACITY = 0.5
MAX_TARGET_CHARS = 200  # a class name is far shorter; longer text is refused before the model runs


def explain(
    service: InferenceService, image: Any, target: str | None, opacity: float, model: str | None = None
) -> tuple[Image.Image, Image.Image, str, Explanation]:
    """Both overlays, a caption, and the explanation itself (kept in the session to re-blend)."""
    with user_errors():
        target = check_text("the class to explain", target, MAX_TARGET_CHARS)
        opacity = check_number("opacity", opacity, 0.0, 1.0)
        source, name = image_source(image)
        explanation = service.explain(source, target or None, name=name, model=model)
    single, multi = blend(explanation, opacity)
    return single, multi, describe(explanation), explanation


def blend(explanation: Explanation, opacity: float) -> tuple[Image.Image, Image.Image]:
    """Single-scale and multi-scale heatmaps over the model's view at `opacity`."""
    return (
        overlay(explanation.view, explanation.cam, opacity),
        overlay(explanation.view, explanation.multi_scale_cam, opacity),
    )


def reblend(explanation: Explanation | None, opacity: float) -> tuple[Any, Any]:
    """The opacity slider's handler: redraw from the stored maps, or leave the outputs alone if none yet."""
    if explanation is None:
        return gr.skip(), gr.skip()
    with user_errors():
        return blend(explanation, check_number("opacity", opacity, 0.0, 1.0))


def describe(explanation: Explanation) -> str:
    """Caption: which class the heatmaps explain, the top predictions, and the scales that were fused."""
    predicted = explanation.predicted.as_dict().items()
    top = ", ".join(f"{escape_markdown(label)} {prob:.1%}" for label, prob in predicted)
    scales = ", ".join(f"{scale:g}x" for scale in explanation.scales)
    return (
        f"Explaining **{escape_markdown(explanation.label)}** (probability {explanation.prob:.1%}).  \n"
        f"Top predictions: {top}.  \n"
        f"Multi-scale view: Grad-CAM at {scales} the input size, averaged."
    )


def class_choices(service: InferenceService, model: str | None = None) -> Any:
    """The class menu for the session's model: its classes, after "Predicted class"."""
    return gr.Dropdown(
        choices=[("Predicted class", PREDICTED), *[(label, label) for label in service.info(model).labels]],
        value=PREDICTED,
    )


def build(service: InferenceService, model: gr.State | None = None) -> list[ModelView]:
    """Create the tab's components and wire its `explain` event and the opacity slider; returns what a model
    change redraws."""
    with gr.Row():
        with gr.Column(scale=1):
            image = gr.Image(
                label="Photo", type="filepath", sources=IMAGE_SOURCES, height=300, elem_id="explain-image"
            )
            target = gr.Dropdown(
                choices=[("Predicted class", PREDICTED), *[(label, label) for label in service.labels]],
                value=PREDICTED,
                label="Class to explain",
                filterable=True,
                allow_custom_value=True,  # the API takes any string; the service names unknown classes
            )
            opacity = gr.Slider(
                0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Heatmap opacity", elem_id="explain-opacity"
            )
            button = gr.Button("Explain", variant="primary", elem_id="explain-button")
        with gr.Column(scale=2):
            with gr.Row():
                single = gr.Image(
                    label="Grad-CAM at the input size",
                    type="pil",
                    interactive=False,
                    elem_id="explain-single",
                )
                multi = gr.Image(
                    label="Multi-scale Grad-CAM (fused)",
                    type="pil",
                    interactive=False,
                    elem_id="explain-multi",
                )
            caption = gr.Markdown(label="caption", elem_id="explain-caption")
    gr.Examples(examples=example_images(), inputs=image, label="Example photos (scikit-image)")
    explanation = gr.State()
    button.click(
        partial(explain, service),
        inputs=[image, target, opacity, *([model] if model else [])],
        outputs=[single, multi, caption, explanation],
        api_name="explain",
        preprocess=False,  # `open_image` decodes the upload, with clear messages for bad files
        concurrency_limit=1,
        concurrency_id="explain",
    )
    opacity.change(
        reblend,
        inputs=[explanation, opacity],
        outputs=[single, multi],
        api_visibility="private",
        trigger_mode="always_last",
        show_progress="hidden",
    )
    return [(target, partial(class_choices, service))]
