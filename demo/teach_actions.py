"""What the Teach tab's buttons do, without its layout (demo/teach_tab.py): add and fill classes from uploads
or camera bursts, train them on the one engine, export or publish the run. Every value comes from a visitor,
so each is checked here (`demo.ui`) before it reaches the session or the engine.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from demo.run_serving import export_in_child
from demo.service import InferenceService
from demo.teach import CAPTURE_FPS, FRAME_SIDE, MAX_CAPTURE_S, MAX_IMAGES_PER_CLASS, TeachSession
from demo.train_progress import render_progress
from demo.train_tab import final_metrics, zip_for_download
from demo.training_jobs import TrainingManager
from demo.training_status import FAILED, TrainOptions
from demo.ui import check_number, check_text, image_source, public_message, uploaded_paths, user_errors
from demo.uploads import import_class_files
from finetune.class_names import MAX_CLASS_NAME
from finetune.errors import CheckpointError, DatasetError
from finetune.export import ONNX_FILE
from finetune.images import UPLOAD_LIMITS, open_image
from finetune.modeling import DEFAULT_MODEL
from finetune.safe_text import escape_html, escape_markdown, markdown_code

MIN_IMAGES = 4  # per class: at least one validation image each, and a probe that means something
BUDGET_S = (10, 120, 20)  # the time-budget slider: min, max, default (seconds)
SHOWN_THUMBNAILS = 24  # the gallery shows the newest images of the class being filled
DRAFT = (FRAME_SIDE, FRAME_SIDE)  # large JPEGs decode at a fraction of their size: frames are stored this big
PROGRESS_EVERY_S = 0.5  # the train event yields at most this often


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
        zip_path = Path(zip_for_download(manager, run_id))  # also refuses a run still training
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
