"""The Teach tab: Teachable Machine's flow on the real engine. Add classes, fill them from the webcam or
uploads, train in seconds, watch the live preview, then download, export or publish the run.

Classes and images live in the visitor's session (`demo.teach.TeachStore`, keyed by the session hash and
dropped when the page closes). Training is the Train tab's: the classes are imported like typed class uploads
(`demo.uploads.import_class_files`) and queued on the one `TrainingManager`, so the run folder, the progress,
the queue and the owner (`demo.lanes`) are the same; only the recipe differs, a short time budget under the
`auto` strategy (the linear probe first, then a short fine-tune only when it fits the budget; under 24
images per class, the probe alone, refitted on every image: finetune/recipe.py). When the run ends it becomes
this session's model, so the live preview (`demo.live`) uses it at once.

APIs (all per session): `teach_add_class` (name), `teach_add_images` (class, files), `teach_delete_image`
(class, image number from 1), `teach_remove_class` (class), `teach_train` (model, budget in seconds) ->
(run id, progress, metrics), `teach_export_onnx` (run id) -> model.onnx; `live` is `demo.live`'s.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from demo import live
from demo.model_picker import menu_update, owner_of
from demo.run_serving import export_in_child
from demo.service import InferenceService
from demo.teach import (
    CAPTURE_FPS,
    FRAME_SIDE,
    MAX_CAPTURE_S,
    MAX_IMAGES_PER_CLASS,
    TeachSession,
    TeachStore,
)
from demo.train_tab import DOWNLOAD_ROOT, _zip_for_download, final_metrics, render_progress
from demo.training_jobs import FAILED, TrainingManager, TrainOptions
from demo.ui import check_number, check_text, image_source, public_message, uploaded_paths, user_errors
from demo.uploads import import_class_files
from finetune.class_names import MAX_CLASS_NAME
from finetune.errors import CheckpointError, DatasetError
from finetune.export import ONNX_FILE
from finetune.images import UPLOAD_LIMITS, open_image
from finetune.modeling import DEFAULT_MODEL
from finetune.safe_text import escape_html, escape_markdown, markdown_code

logger = logging.getLogger(__name__)

MIN_IMAGES = 4  # per class: at least one validation image each, and a probe that means something
BUDGET_S = (10, 120, 20)  # the time-budget slider: min, max, default (seconds)
SHOWN_THUMBNAILS = 24  # the gallery shows the newest images of the class being filled
CAPTURE_STREAM_EVERY_S = 1.0 / CAPTURE_FPS
CAPTURE_TIME_LIMIT_S = 300  # one camera stream; bursts are recorded while it runs
DRAFT = (FRAME_SIDE, FRAME_SIDE)  # large JPEGs decode at a fraction of their size: frames are stored this big
PROGRESS_EVERY_S = 0.5  # the train event yields at most this often
INTRO = (
    "Teach the model your own classes in a minute: **add a class**, then fill it with a burst from the "
    "camera (start it with its *Record* button, then press *Capture burst*) or with uploaded images; "
    "at least "
    f"{MIN_IMAGES} images per class, a few dozen are better. **Train** fits a probe in seconds (and a short "
    "fine-tune when the budget allows); the **live preview** below then classifies the camera image with it."
)


def add_class(session: TeachSession, name: Any) -> str:
    """Add an empty class; returns its name."""
    with user_errors():
        return session.add_class(check_text("the class name", name, MAX_CLASS_NAME + 10))


def add_images(session: TeachSession, name: Any, files: Any) -> int:
    """Add uploaded images to class `name`; returns how many were added (unreadable files are refused)."""
    with user_errors():
        name = check_text("the class", name, MAX_CLASS_NAME)
        paths = uploaded_paths(files)
        room = MAX_IMAGES_PER_CLASS - session.counts().get(name, 0)
        session.images(name)  # an unknown class is refused before any decoding
        if len(paths) > max(room, 0):
            raise DatasetError(
                f"{len(paths)} images sent; this class has room for {max(room, 0)} more "
                f"(at most {MAX_IMAGES_PER_CLASS} a class)."
            )
        for path in paths:
            session.add_image(name, open_image(path, DRAFT, limits=UPLOAD_LIMITS, name=path.name))
    return len(paths)


def delete_image(session: TeachSession, name: Any, number: Any) -> None:
    """Delete image `number` (1 = the first) of class `name`."""
    with user_errors():
        name = check_text("the class", name, MAX_CLASS_NAME)
        index = check_number("the image number", number, 1, MAX_IMAGES_PER_CLASS, whole=True) - 1
        session.delete_image(name, index)


def remove_class(session: TeachSession, name: Any) -> None:
    with user_errors():
        session.remove_class(check_text("the class", name, MAX_CLASS_NAME))


def start_capture(session: TeachSession, name: Any, seconds: Any) -> str:
    """Open a burst: the camera's next `seconds` of frames go to class `name`."""
    with user_errors():
        name = check_text("the class", name, MAX_CLASS_NAME)
        seconds = check_number("the burst length (seconds)", seconds, 1, MAX_CAPTURE_S)
        session.start_capture(name, seconds)
    return f"Recording {seconds:g} s into **{escape_markdown(name)}** ({CAPTURE_FPS:g} frames/s)."


def capture_frame(session: TeachSession, frame: Any) -> bool:
    """A streamed camera frame: kept when a burst is open (checked before decoding); True when kept."""
    if not session.is_capturing or frame is None or frame == "" or frame == {}:
        return False
    with user_errors():
        source, _ = image_source(frame)
        return session.capture(open_image(source, DRAFT, limits=UPLOAD_LIMITS))


def teach_train(
    manager: TrainingManager,
    session: TeachSession,
    model: Any,
    budget_s: Any,
    owner: str | None = None,
) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """Import the session's classes, queue them on the one engine, follow the run: yields (run id,
    progress HTML, status), the last with the final metrics."""
    with user_errors():
        budget_s = check_number("the time budget (seconds)", budget_s, BUDGET_S[0], BUDGET_S[1])
        model = check_text("the model", model, 200) or DEFAULT_MODEL
        counts = session.counts()
        short = [name for name, count in counts.items() if count < MIN_IMAGES]
        if len(counts) < 2 or short:
            raise DatasetError(
                f"add at least 2 classes with at least {MIN_IMAGES} images each"
                + (f"; {', '.join(short)} need more." if short else ".")
            )
        manager.check_room(owner)
        dataset = import_class_files(session.as_classes(), manager.datasets_dir)
        options = TrainOptions(model=model, strategy="auto", epochs=0, time_budget_s=budget_s)
        run_id = manager.submit(dataset.root, list(dataset.class_counts), options, owner=owner)
    status = manager.status(run_id)
    yield run_id, render_progress(status), {"state": status.state}
    shown = 0.0
    while not status.is_finished:
        status = manager.wait(run_id, status.version, timeout_s=30)
        if time.monotonic() - shown >= PROGRESS_EVERY_S or status.is_finished:
            shown = time.monotonic()
            yield run_id, render_progress(status), {"state": status.state}
    if status.state == FAILED:
        raise gr.Error(escape_html(public_message(status.error), quote=False), print_exception=False)
    yield run_id, render_progress(status), final_metrics(status, dataset)


def export_run_onnx(manager: TrainingManager, service: InferenceService, run_id: Any, owner: str) -> str:
    """`<run id>.onnx` of one of `owner`'s runs (checked against PyTorch), where Gradio may serve it from.

    The export runs in a child process (`demo.run_serving`): tracing in this one would break the PyTorch
    forward passes of other requests. The serving export usually wrote the file already.
    """
    with user_errors():
        run_id = check_text("the run id", run_id, 200).strip()
        manager.check_owner(run_id, owner)
        zip_path = Path(_zip_for_download(manager, run_id))  # also refuses a run still training
        target = zip_path.with_suffix(".onnx")
        if not target.is_file():
            run_dir = manager.runs_dir / run_id
            with service.export_lock:  # after the serving export of `demo.run_serving`, which this reuses
                exported = (
                    run_dir / ONNX_FILE if (run_dir / ONNX_FILE).is_file() else export_in_child(run_dir)
                )
            if exported is None:
                raise CheckpointError("this run could not be exported to ONNX; download the run instead.")
            shutil.copyfile(exported, target)
    return str(target)


def publish_command(run_id: str) -> str:
    """How to put the downloaded run on the Hugging Face Hub with the existing command."""
    name = markdown_code(f"{run_id}.zip")
    return (
        f"**Publish it on the Hub**: unzip {name} and run\n\n"
        f"```\npython -m finetune.publish {run_id} --repo-id USER/NAME\n```\n"
        "(add `--dry-run` to read the model card first; it needs `HF_TOKEN` or `hf auth login`)."
    )


def class_view(session: TeachSession, selected: str | None = None) -> tuple[Any, Any, Any]:
    """(class menu, counts, gallery of the selected class's newest images)."""
    counts = session.counts()
    name = selected if selected in counts else next(reversed(counts), None)
    images = session.images(name)[-SHOWN_THUMBNAILS:] if name else []
    offset = len(session.images(name)) - len(images) if name else 0
    gallery = [(str(path), f"{name} #{offset + n + 1}") for n, path in enumerate(images)]
    return gr.Dropdown(choices=list(counts), value=name), counts, gallery


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
            zipped = _zip_for_download(manager, run)
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
