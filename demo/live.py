"""Live preview: the webcam image classified frame after frame by the visitor's current model, with its rate.

Two doors to one function (`classify_frame`):
- In the browser, a streaming webcam (`gr.Image(streaming=True)` and its `.stream()` event): the page sends a
  frame every `STREAM_EVERY_S` for at most `TIME_LIMIT_S` a stream, and the top classes and the frame rate
  update in place. Gradio keeps one *latest* frame per stream (its `/stream/<event_id>` route overwrites the
  event's data and wakes the handler), so when the server is busy frames are skipped, never queued: the
  answer always belongs to a recent frame. Each stream holds one of `MAX_STREAMS` slots while it runs.
- For scripts, the `live` API: one frame in (an upload or a `data:` URL), the same label dict as `classify`
  out, on the session's model. gradio_client 2.7 cannot follow Gradio's stream protocol (it stops at the
  `process_streaming` message), so the stream event itself is the page's private one and `live` is a plain
  event that a script calls frame after frame.
Frames from the stream route bypass the queue's admission checks (`demo.admission`), so the handler checks
every frame itself (`demo.ui.image_source`).
"""

from __future__ import annotations

import time
from typing import Any

import gradio as gr

from demo.service import InferenceService
from demo.ui import image_source, user_errors

STREAM_EVERY_S = 0.1  # the page sends up to 10 frames a second; a busy server answers the latest one
TIME_LIMIT_S = 120  # one stream's length; the visitor starts another with one click
MAX_STREAMS = 8  # streams running at once (each holds a queue slot while it runs)
TOP_K = 5  # classes shown, as Classify's default
RATE_WINDOW = 20  # frames the rate is measured over


def classify_frame(
    service: InferenceService, frame: Any, model: str | None = None, k: int = TOP_K
) -> dict[str, float]:
    """`{label: prob}` of one frame by the session's `model` (None: the default), as `classify` gives it."""
    with user_errors():
        source, name = image_source(frame)
        return service.predict_topk(source, k, name=name, model=model).as_dict()


def frame_rate(times: list[float] | None, now: float) -> tuple[list[float], float]:
    """The last `RATE_WINDOW` answer times with `now` added, and the answers per second over them."""
    recent = [*(times or [])[-(RATE_WINDOW - 1) :], now]
    span = recent[-1] - recent[0]
    return recent, (len(recent) - 1) / span if span > 0 else 0.0


def describe_rate(fps: float, latency_s: float) -> str:
    """The line under the live label: frames answered per second and the time one frame took."""
    shown = f"{fps:.1f} frames/s" if fps else "first frame"
    return f"**{shown}** · {latency_s * 1000:.0f} ms a frame"


def stream_frame(
    service: InferenceService, frame: Any, times: list[float] | None, model: str | None
) -> tuple[Any, Any, Any]:
    """One streamed frame: (labels, rate line, answer times); nothing changes while the camera sends none."""
    if frame is None or frame == "" or frame == {}:
        return gr.skip(), gr.skip(), gr.skip()
    start = time.perf_counter()
    labels = classify_frame(service, frame, model)
    times, fps = frame_rate(times, time.monotonic())
    return labels, describe_rate(fps, time.perf_counter() - start), times


def build(service: InferenceService, model: gr.State) -> None:
    """The preview: a streaming webcam and an image upload (for pages without a camera), one label."""
    with gr.Row():
        with gr.Column():
            camera = gr.Image(
                label="Live camera (press the record button to start the preview)",
                sources=["webcam"],
                streaming=True,
                type="filepath",
                height=300,
                elem_id="live-camera",
            )
            still = gr.Image(
                label="No camera? Test with an image",
                sources=["upload", "clipboard"],
                type="filepath",
                height=200,
                elem_id="live-image",
            )
        with gr.Column():
            label = gr.Label(label="Live prediction", num_top_classes=TOP_K, elem_id="live-label")
            rate = gr.Markdown(elem_id="live-rate")
    times = gr.State(None)

    def on_frame(frame: Any, times: list[float] | None, model: str | None) -> tuple[Any, Any, Any]:
        return stream_frame(service, frame, times, model)

    def live(image: Any, model: str | None) -> dict[str, float]:
        return classify_frame(service, image, model)

    camera.stream(
        on_frame,
        inputs=[camera, times, model],
        outputs=[label, rate, times],
        api_visibility="private",  # the page's; scripts call `live`
        preprocess=False,  # frames are checked by `image_source`, as uploads are
        stream_every=STREAM_EVERY_S,
        time_limit=TIME_LIMIT_S,
        concurrency_limit=MAX_STREAMS,
        concurrency_id="live_stream",
        show_progress="hidden",
    )
    still.upload(
        live,
        inputs=[still, model],
        outputs=label,
        api_name="live",
        preprocess=False,
        concurrency_limit=2 * service.max_batch_size,  # frames of several visitors share forward passes
        concurrency_id="live",
        trigger_mode="always_last",  # a new image while one is answered: only the newest is answered next
        show_progress="hidden",
    )
