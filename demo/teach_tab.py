"""The Teach tab: Teachable Machine's flow on the real engine. Add classes, fill them from the webcam or
uploads, train in seconds, watch the live preview, then download, export or publish the run.

Classes and images live in the visitor's session (`demo.teach.TeachStore`, keyed by the session hash and
dropped when the page closes). Training is the Train tab's: the classes are imported like typed class uploads
(`demo.uploads.import_class_files`) and queued on the one `TrainingManager`, so the run folder, the progress,
the queue and the owner (`demo.lanes`) are the same; only the recipe differs, a short time budget under the
`auto` strategy (the linear probe first, then a short fine-tune only when it fits the budget; under 24
images per class, the probe alone, refitted on every image: finetune/recipe.py). When the run ends it becomes
this session's model, so the live preview (`demo.live`) uses it at once. This module lays the tab out and
wires its events; what each button does, with its input checks, is demo/teach_actions.py.

APIs (all per session): `teach_add_class` (name), `teach_add_images` (class, files), `teach_delete_image`
(class, image number from 1), `teach_remove_class` (class), `teach_train` (model, budget in seconds) ->
(run id, progress, metrics), `teach_export_onnx` (run id) -> model.onnx; `live` is `demo.live`'s.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from demo import live
from demo.model_picker import menu_update, owner_of
from demo.service import InferenceService
from demo.teach import (
    CAPTURE_FPS,
    MAX_CAPTURE_S,
    TeachSession,
    TeachStore,
)
from demo.teach_actions import (
    BUDGET_S,
    MIN_IMAGES,
    SHOWN_THUMBNAILS,
    add_class,
    add_images,
    capture_frame,
    class_view,
    delete_image,
    export_run_onnx,
    publish_command,
    remove_class,
    start_capture,
    teach_train,
)
from demo.train_tab import DOWNLOAD_ROOT, zip_for_download
from demo.training_jobs import TrainingManager
from demo.ui import user_errors
from finetune.modeling import DEFAULT_MODEL

logger = logging.getLogger(__name__)

CAPTURE_STREAM_EVERY_S = 1.0 / CAPTURE_FPS
CAPTURE_TIME_LIMIT_S = 300  # one camera stream; bursts are recorded while it runs
INTRO = (
    "Teach the model your own classes in a minute: **add a class**, then fill it with a burst from the "
    "camera (start it with its *Record* button, then press *Capture burst*) or with uploaded images; "
    "at least "
    f"{MIN_IMAGES} images per class, a few dozen are better. **Train** fits a probe in seconds (and a short "
    "fine-tune when the budget allows); the **live preview** below then classifies the camera image with it."
)


def build(
    service: InferenceService,
    manager: TrainingManager,
    model_menu: gr.Dropdown,
    model_state: gr.State,
) -> Callable[[gr.Request], None]:
    """Create the tab and wire its events; returns the page-unload handler that drops the session."""
    store = TeachStore(store_root(manager))
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            with gr.Row():
                name = gr.Textbox(label="New class", placeholder="e.g. thumbs up", elem_id="teach-class-name")
                add = gr.Button("Add class", elem_id="teach-add-class", scale=0)
            target = gr.Dropdown(  # custom values: the handlers check the session's classes themselves
                [], label="Class to fill", allow_custom_value=True, elem_id="teach-target"
            )
            counts = gr.JSON(label="Images per class", elem_id="teach-counts")
            camera = gr.Image(
                label="Camera (press its Record button, then Capture burst)",
                sources=["webcam"],
                streaming=True,
                type="filepath",
                height=240,
                elem_id="teach-camera",
            )
            with gr.Row():
                seconds = gr.Slider(
                    1, MAX_CAPTURE_S, value=3, step=1, label="Burst (s)", elem_id="teach-seconds"
                )
                record = gr.Button("Capture burst", variant="primary", elem_id="teach-record", scale=0)
            recording = gr.Markdown(elem_id="teach-recording")
            files = gr.File(
                label="…or add images to this class",
                file_count="multiple",
                file_types=["image"],
                elem_id="teach-files",
            )
        with gr.Column(scale=1):
            gallery = gr.Gallery(
                label="Newest images of this class (click one, then Delete image)",
                columns=6,
                height=260,
                allow_preview=False,
                elem_id="teach-gallery",
            )
            with gr.Row():
                picked = gr.Number(
                    None, label="Image number (click one)", precision=0, minimum=1, elem_id="teach-picked"
                )
                delete = gr.Button("Delete image", size="sm", elem_id="teach-delete-image")
                drop = gr.Button("Delete class", size="sm", variant="stop", elem_id="teach-remove-class")
            with gr.Row():
                model = gr.Dropdown(
                    manager.model_choices(), value=DEFAULT_MODEL, label="Model", elem_id="teach-model"
                )
                budget = gr.Slider(
                    *BUDGET_S[:2], value=BUDGET_S[2], step=5, label="Time budget (s)", elem_id="teach-budget"
                )
            train = gr.Button("Train", variant="primary", elem_id="teach-train")
            progress = gr.HTML(elem_id="teach-progress")
            run_id = gr.Textbox(label="Run id", interactive=False, elem_id="teach-run-id")
            metrics = gr.JSON(label="Result", elem_id="teach-metrics")
            with gr.Row():
                download = gr.File(label="Run (zip)", interactive=False, elem_id="teach-download")
                onnx = gr.File(label="ONNX", interactive=False, elem_id="teach-onnx")
            export = gr.Button("Export ONNX", size="sm", elem_id="teach-export")
            publish = gr.Markdown(elem_id="teach-publish")
    gr.Markdown("### Live preview (your newest model, or the one picked in the Model menu)")
    live.build(service, model_state)

    def session(request: gr.Request) -> TeachSession:
        return store.session(request.session_hash)

    def on_add(new: str, request: gr.Request) -> tuple[Any, ...]:
        created = add_class(session(request), new)
        return "", *class_view(session(request), created)

    def on_files(chosen: str, uploads: Any, request: gr.Request) -> tuple[Any, ...]:
        add_images(session(request), chosen, uploads)
        return None, *class_view(session(request), chosen)

    def on_delete(chosen: str, number: Any, request: gr.Request) -> tuple[Any, ...]:
        delete_image(session(request), chosen, number)
        return None, *class_view(session(request), chosen)

    def on_remove(chosen: str, request: gr.Request) -> tuple[Any, ...]:
        remove_class(session(request), chosen)
        return class_view(session(request))

    def on_view(chosen: str, request: gr.Request) -> tuple[Any, ...]:
        return class_view(session(request), chosen)

    def on_record(chosen: str, length: float, request: gr.Request) -> str:
        return start_capture(session(request), chosen, length)

    def on_frame(frame: Any, chosen: str, request: gr.Request) -> tuple[Any, ...]:
        if not capture_frame(session(request), frame):
            return gr.skip(), gr.skip(), gr.skip()
        return class_view(session(request), chosen)

    def on_pick(chosen: str, event: gr.SelectData, request: gr.Request) -> int:
        images = session(request).images(chosen) if chosen in session(request).counts() else []
        return max(0, len(images) - SHOWN_THUMBNAILS) + int(event.index) + 1

    def on_train(model: str, time_budget_s: float, request: gr.Request) -> Iterator[tuple[Any, ...]]:
        owner = owner_of(service, request)
        last = None
        for last in teach_train(manager, session(request), model, time_budget_s, owner):
            yield *last, gr.skip()
        if last is not None and manager.status(last[0]).has_model:
            service.lanes.use(request.session_hash, last[0])  # pruning keeps it while this page is open
            yield *last, last[0]  # the session's model: the live preview and Classify use it now

    def on_trained(run: str, chosen_model: str | None, request: gr.Request) -> tuple[Any, ...]:
        if not run or not manager.status(run).has_model:
            return gr.skip(), gr.skip(), gr.skip()
        with user_errors():
            manager.check_owner(run, owner_of(service, request))
            zipped = zip_for_download(manager, run)
        return menu_update(service, chosen_model, request), zipped, publish_command(run)

    def on_export(run: str, request: gr.Request) -> str:
        return export_run_onnx(manager, service, run, owner_of(service, request))

    def on_unload(request: gr.Request) -> None:
        store.drop(request.session_hash)

    view = [target, counts, gallery]
    private: dict[str, Any] = {"api_visibility": "private", "show_progress": "hidden"}
    add.click(on_add, name, [name, *view], api_name="teach_add_class", concurrency_limit=None)
    name.submit(on_add, name, [name, *view], concurrency_limit=None, **private)
    files.upload(on_files, [target, files], [files, *view], api_name="teach_add_images", concurrency_limit=4)
    target.input(on_view, target, view, queue=False, **private)
    gallery.select(on_pick, target, picked, queue=False, **private)
    delete.click(
        on_delete, [target, picked], [picked, *view], api_name="teach_delete_image", concurrency_limit=None
    )
    drop.click(on_remove, target, view, api_name="teach_remove_class", concurrency_limit=None)
    record.click(on_record, [target, seconds], recording, queue=False, **private)
    camera.stream(
        on_frame,
        [camera, target],
        view,
        preprocess=False,
        stream_every=CAPTURE_STREAM_EVERY_S,
        time_limit=CAPTURE_TIME_LIMIT_S,
        concurrency_limit=live.MAX_STREAMS,
        concurrency_id="teach_camera",
        **private,
    )
    train.click(
        on_train,
        [model, budget],
        [run_id, progress, metrics, model_state],
        api_name="teach_train",
        concurrency_limit=manager.max_queued + 1,
        concurrency_id="train",
        show_progress="minimal",
    ).then(on_trained, [run_id, model_state], [model_menu, download, publish], **private)
    export.click(on_export, run_id, onnx, api_name="teach_export_onnx", concurrency_limit=1)
    return on_unload


def store_root(manager: TrainingManager) -> Path:
    """Where the Teach sessions of this data folder keep their images: under the temp folder (Gradio serves
    the thumbnails from there), one folder per data folder, as the run downloads have."""
    data_key = hashlib.sha256(str(manager.runs_dir.resolve()).encode()).hexdigest()[:16]
    return DOWNLOAD_ROOT.parent / "image-recognition-studio-teach" / data_key
