"""The Classify tab: one photo in (upload, webcam or clipboard), its top-k classes out, latency, a model card.

Its event is the app's `classify` API: (image, k) -> label dict (`label`, `confidences`, and the "none of
these" verdict: `unknown` true/false, or null when rejection is off for the model, `ood_score`, `message`).
Requests run up to the service's batch size at once, so visitors who arrive together share one forward pass
(see `demo.batching`).
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from demo.model_picker import ModelView
from demo.service import InferenceService, ModelInfo
from demo.ui import check_number, image_source, user_errors
from finetune import multilabel_card
from finetune.inference import Prediction
from finetune.safe_text import escape_markdown, markdown_code
from finetune.trust import describe_trust

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
DEFAULT_K = 5
MAX_K = 20
IMAGE_SOURCES = ["upload", "webcam", "clipboard"]


def example_images() -> list[str]:
    """The real photos shipped under demo/examples/ (written by make_examples.py)."""
    return [str(path) for path in sorted(EXAMPLES_DIR.glob("*.jpg"))]


class Verdict(dict):
    """Top-k `{label: prob}` (what `gr.Label` shows) that also carries the "none of these" verdict."""

    def __init__(self, prediction: Prediction, num_classes: int) -> None:
        super().__init__(prediction.as_dict())
        self.unknown = prediction.unknown
        self.ood_score = prediction.ood_score
        self.message = unknown_message(prediction, num_classes) if prediction.unknown else ""

    def extra(self) -> dict[str, Any]:
        """The keys the API result carries beside `label` and `confidences`."""
        return {"unknown": self.unknown, "ood_score": self.ood_score, "message": self.message}


def verdict_label(**options: Any) -> gr.Label:
    """A `gr.Label` whose value also has `unknown`, `ood_score` and `message` when given a `Verdict`: API
    clients get the flag, clients that read only `label` and `confidences` see no change.

    Its instance's `postprocess` is wrapped rather than subclassed: Gradio writes a `.pyi` stub beside the
    module of every Component subclass when it is imported, which a server must not do to its own source.
    """
    label = gr.Label(**options)
    plain = label.postprocess

    def postprocess(value: Any) -> Any:
        data = plain(dict(value) if isinstance(value, Verdict) else value)
        if isinstance(value, Verdict):
            data = {**(data.model_dump() if hasattr(data, "model_dump") else dict(data)), **value.extra()}
        return data

    label.postprocess = postprocess  # type: ignore[method-assign]
    return label


def unknown_message(prediction: Prediction, num_classes: int) -> str:
    """The plain sentence for a rejected image (plain text for API clients; `describe_outcome` escapes it)."""
    return (
        f"Not one of the {num_classes} classes this model knows; closest: "
        f"{prediction.label} ({prediction.prob:.0%})."
    )


def classify(
    service: InferenceService, image: Any, k: float, model: str | None = None
) -> tuple[Verdict, float]:
    """Top-k `{label: prob}` by the session's `model` for the `gr.Label` (with the "none of these" verdict
    attached, see `Verdict`), and the seconds it took."""
    with user_errors():
        # The slider's own range; a k above a small model's class count is clamped (all its classes are shown)
        k = check_number("k", k, 1, MAX_K, whole=True)
        source, name = image_source(image)
        start = time.perf_counter()
        prediction = service.predict_topk(source, k, name=name, model=model)
        num_classes = len(service.info(model).labels)
    return Verdict(prediction, num_classes), time.perf_counter() - start


def describe_outcome(result: tuple[str, float] | None) -> str:
    """The line under the result: the "none of these" sentence when the image was rejected, and latency."""
    if result is None:
        return ""
    message, latency_s = result
    latency = describe_latency(latency_s)
    # class names come from a stranger's folders: escaped (finetune.safe_text)
    return f"**{escape_markdown(message)}**  \n{latency}" if message else latency


def describe_latency(latency_s: float | None) -> str:
    """One line under the result: server time from upload to answer (decode, batch wait, inference)."""
    if latency_s is None:
        return ""
    return f"Answered in **{latency_s * 1000:.0f} ms** on the server (decoding, batching and inference)."


def model_card(info: ModelInfo) -> str:
    """Markdown card of the served model: name, classes, where the weights came from, validation metrics."""
    # Names come from a stranger's folders and config.json: every one is escaped (finetune.safe_text).
    shown = ", ".join(escape_markdown(label) for label in info.labels[:8]) + (
        ", ..." if len(info.labels) > 8 else ""
    )
    lines = [
        f"**Model:** {escape_markdown(info.name)}",
        f"**Architecture:** {markdown_code(info.architecture)}, runtime: {info.runtime}",
        f"**Classes ({len(info.labels)}):** {shown}",
        f"**Weights:** {markdown_code(info.weights_source)}",
        f"**Loaded from:** {_source_name(info.source)}",
    ]
    if info.is_multilabel:  # sigmoids and per-label thresholds: no temperature, no "none of these" rule
        lines.append(multilabel_card.CONFIDENCE)
    else:
        lines.extend(describe_trust(info.trust))  # our numbers and a method name from finetune.ood.METHODS
    metrics = _scalar_metrics(info.metrics)
    if metrics:
        shown_metrics = (f"{escape_markdown(key)} {escape_markdown(value)}" for key, value in metrics.items())
        lines.append("**Validation:** " + ", ".join(shown_metrics))
    else:
        lines.append("**Validation:** no metrics recorded for this model.")
    return "  \n".join(lines)


def k_slider(service: InferenceService, model: str | None = None) -> Any:
    """The k slider's range and default for the session's model (a 2-class run shows at most 2)."""
    num_classes = len(service.info(model).labels)
    return gr.Slider(maximum=min(MAX_K, num_classes), value=min(DEFAULT_K, num_classes))


def build(service: InferenceService, model: gr.State | None = None) -> list[ModelView]:
    """Create the tab's components and wire its `classify` event (on the session's `model`); returns what a
    model change redraws."""
    num_classes = len(service.labels)
    with gr.Row():
        with gr.Column():
            image = gr.Image(
                label="Photo", type="filepath", sources=IMAGE_SOURCES, height=360, elem_id="classify-image"
            )
            k = gr.Slider(
                1,
                min(MAX_K, num_classes),
                value=min(DEFAULT_K, num_classes),
                step=1,
                label="Classes shown (k)",
            )
            button = gr.Button("Classify", variant="primary", elem_id="classify-button")
        with gr.Column():
            label = verdict_label(label=answer_title(service), elem_id="classify-label")
            latency = gr.Markdown(elem_id="classify-latency")
            with gr.Accordion("About the model", open=True):
                card = gr.Markdown(model_card(service.info()), elem_id="classify-model-card")
    gr.Examples(examples=example_images(), inputs=image, label="Example photos (scikit-image)")
    outcome = gr.State()  # (the "none of these" sentence or "", seconds): shown, not part of the API
    button.click(
        partial(_classify_and_outcome, service),
        inputs=[image, k, *([model] if model else [])],
        outputs=[label, outcome],
        api_name="classify",
        preprocess=False,  # `open_image` decodes the upload, with clear messages for bad files
        concurrency_limit=2 * service.max_batch_size,  # a full batch waits while the previous one runs
        concurrency_id="classify",
    ).success(describe_outcome, outcome, latency, api_visibility="private", queue=False)
    views = [(card, lambda name: model_card(service.info(name))), (k, partial(k_slider, service))]
    return [*views, (label, partial(label_box, service))]


def label_box(service: InferenceService, model: str | None = None) -> Any:
    """The answer's title: a multi-label model shows every label above its own threshold, with independent
    probabilities that need not sum to 1 (and may be none)."""
    return gr.Label(label=answer_title(service, model))


def answer_title(service: InferenceService, model: str | None = None) -> str:
    if service.info(model).is_multilabel:
        return "Labels present (independent probabilities, each above its own threshold)"
    return "Top classes"


def _classify_and_outcome(
    service: InferenceService, image: Any, k: float, model: str | None = None
) -> tuple[Verdict, tuple[str, float]]:
    """`classify`, with the verdict sentence beside the latency for the line under the result."""
    verdict, latency_s = classify(service, image, k, model)
    return verdict, (verdict.message, latency_s)


def _source_name(source: str) -> str:
    """Where the weights came from, as a visitor may see it: the run's name, never its server path."""
    return (
        "this package (no run folder)" if source == "embedded" else f"run {markdown_code(Path(source).name)}"
    )


def _scalar_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Numbers and words from a run's metrics, nested dicts flattened ("best.val_acc"); curves left out."""
    flat: dict[str, str] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_scalar_metrics(value, f"{prefix}{key}."))
        elif isinstance(value, float):
            flat[f"{prefix}{key}"] = f"{value:.4g}"
        elif isinstance(value, (int, str)):
            flat[f"{prefix}{key}"] = str(value)
    return flat
