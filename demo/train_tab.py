"""The Train tab: upload classes, train in the background on the one engine, watch it, use the new model.

Its event is the app's `train` API: (zip of class folders, model, strategy, epochs, time budget in minutes) ->
(run id, final metrics). It blocks until the run ends (yielding the queue position and epochs on the way),
so a `gradio_client` caller gets the result from `predict()`; `cancel_training` (run id) stops a run. In the
browser, a timer polls the `TrainingManager` for the progress bar, the epoch table and the curves, and when
the run ends the Model menu is refreshed and the run folder is offered as a zip. A run is its trainer's
(`demo.lanes`): polling, cancel, the zip and the menu check the caller's owner key, with one refusal.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from demo.data_check_view import render_data_check
from demo.lanes import NOBODY
from demo.model_picker import menu_update, owner_of
from demo.run_serving import serve_new_run
from demo.service import InferenceService
from demo.train_progress import EPOCH_COLUMNS, curves_image, epoch_table, render_progress, result_note
from demo.training_jobs import TrainingManager
from demo.training_status import FAILED, QUEUED, JobStatus, TrainOptions
from demo.ui import check_number, public_message, uploaded_path, uploaded_paths, user_errors
from demo.uploads import ImportedDataset, import_class_files, import_zip, parse_class_names
from finetune.checkpoint import load_run
from finetune.config import STRATEGIES
from finetune.disk import prune_folder
from finetune.errors import DatasetError, StudioError
from finetune.modeling import DEFAULT_MODEL
from finetune.safe_text import escape_html

logger = logging.getLogger(__name__)

MAX_TYPED_CLASSES = 6  # class-name mode offers this many upload boxes; more classes belong in a zip
DEFAULT_BUDGET_MIN = 5.0
MAX_EPOCHS = 200  # the epochs box's range (0 = automatic), which API callers must keep to as well
MIN_BUDGET_MIN, MAX_BUDGET_MIN = 1, 120  # the time-budget slider's range, in minutes
POLL_S = 1.0  # progress refresh period in the browser
ZIP_SOURCE, CLASSES_SOURCE = "Zip of class folders", "Class names + images"
DOWNLOAD_ROOT = Path(tempfile.gettempdir()) / "image-recognition-studio-runs"
KEEP_DOWNLOADS_S = 3600  # run zips older than this are deleted (Gradio has copied them into its cache)
MAX_LISTED_SKIPS = 100  # skipped files returned through the API; the summary line names the first few
INTRO = (
    "Teach the model new classes: upload a **zip with one folder per class** (`cats/1.jpg`, `dogs/1.jpg`, "
    "...), a zip with a `labels.csv` (`path,labels`) beside its images for photos that show several "
    "things, or type class names and add images to each. Training runs on the server in the background; "
    "when it ends, the new model is in the **Model** menu above."
)


def serve_trained_runs(manager: TrainingManager, service: InferenceService) -> None:
    """Serve every finished run under the data folder now, and each new one as soon as it finishes, to its
    owner only (runs found without an owner record: to nobody, unless runs are shared)."""

    def add(run_id: str, run_dir: Path) -> None:
        service.lanes.claim(run_id, manager.owner_of(run_id) or NOBODY)  # before it is served
        service.add_run(run_id, load_run(run_dir), make_default=False)

    def add_new(run_id: str, run_dir: Path) -> None:  # answers on PyTorch at once, ONNX follows
        service.lanes.claim(run_id, manager.owner_of(run_id) or NOBODY)
        serve_new_run(service, run_id, run_dir)

    manager.on_model_ready = add_new
    manager.on_run_removed = service.remove_run
    manager.runs_in_use = service.lanes.in_use
    for run_dir in manager.existing_runs():
        try:
            add(run_dir.name, run_dir)
        except StudioError as error:
            logger.warning("Not serving run %s: %s", run_dir.name, error)


def collect_classes(source: str, names_text: str, *files: Sequence[str] | None) -> list | None:
    """Class-name mode: [(name, uploaded paths)] for the typed names; zip mode: None (the zip is used)."""
    if source != CLASSES_SOURCE:
        return None
    with user_errors():
        names = parse_class_names(names_text)
        if len(names) > MAX_TYPED_CLASSES:
            raise DatasetError(
                f"{len(names)} classes typed; this form takes up to {MAX_TYPED_CLASSES}. "
                "Upload a zip with one folder per class for more."
            )
        return [(name, uploaded_paths(files[index])) for index, name in enumerate(names)]


def train(
    manager: TrainingManager,
    zip_file: str | None,
    model: str,
    strategy: str,
    epochs: float,
    time_budget_min: float,
    classes: list | None = None,
    owner: str | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Import the upload, queue the run for `owner` and follow it: yields (run id, status) until the final
    metrics."""
    with user_errors():
        epochs = check_number("epochs", epochs or 0, 0, MAX_EPOCHS, whole=True)
        budget_min = check_number(
            "the time budget (minutes)", time_budget_min or DEFAULT_BUDGET_MIN, MIN_BUDGET_MIN, MAX_BUDGET_MIN
        )
        manager.check_room(owner)  # a full queue or a visitor's second job: refused before unpacking
        dataset = _import(manager, zip_file, classes)
        options = TrainOptions(
            model=model or DEFAULT_MODEL,
            strategy=strategy or "auto",
            epochs=epochs,
            time_budget_s=budget_min * 60,
        )
        run_id = manager.submit(dataset.root, list(dataset.class_counts), options, owner=owner)
    status = manager.status(run_id)
    if status.state == QUEUED and status.queue_position:
        gr.Info(
            f"Another training is running: {status.queue_position} ahead of yours in the queue. Yours starts "
            "by itself when they end; this page follows it."
        )
    yield run_id, _live(status)
    shown = _milestone(status)
    while not status.is_finished:
        status = manager.wait(run_id, status.version, timeout_s=30)
        if _milestone(status) != shown:
            shown = _milestone(status)
            yield run_id, _live(status)
    if status.state == FAILED:
        raise gr.Error(escape_html(public_message(status.error), quote=False), print_exception=False)
    yield run_id, final_metrics(status, dataset)


def cancel_training(manager: TrainingManager, run_id: str, owner: str | None = None) -> str:
    """Stop a queued or running training of `owner`'s; a running one keeps its best checkpoint so far."""
    with user_errors():
        status = manager.cancel(str(run_id or "").strip(), owner)
    return public_message(status.message)


def final_metrics(status: JobStatus, dataset: ImportedDataset) -> dict[str, Any]:
    """What the API returns: state, validation metrics of the kept model, classes and skipped files."""
    return {
        "state": status.state,
        "message": public_message(status.message),
        **status.metrics,
        "classes": status.classes,
        "dataset": dataset.summary(),
        "skipped": [{"file": s.name, "reason": s.reason} for s in dataset.skipped[:MAX_LISTED_SKIPS]],
    }


def poll(
    manager: TrainingManager, run_id: str, shown_epochs: int | None, owner: str | None = None
) -> tuple[Any, ...]:
    """Timer tick: progress bar, epoch table and curves (only when a new epoch ended); stops when done."""
    try:
        if owner is not None:
            manager.check_owner(run_id, owner)
        status = manager.status(run_id)
    except StudioError:  # no run yet, or one this server no longer knows (restarted): nothing to follow
        return gr.skip(), gr.skip(), gr.skip(), shown_epochs, gr.Timer(active=False), gr.skip()
    epochs = len(status.history)
    is_new = epochs != shown_epochs
    return (
        render_progress(status),
        epoch_table(status.history) if is_new else gr.skip(),
        curves_image(status) if is_new else gr.skip(),
        epochs,
        gr.Timer(active=not status.is_finished),
        render_data_check(status.run_dir) if is_new else gr.skip(),  # the checks end with the probe
    )


def finish(
    manager: TrainingManager,
    service: InferenceService,
    run_id: str,
    metrics: dict | None,
    model: str | None = None,
    request: gr.Request | None = None,
) -> tuple[Any, ...]:
    """After the run: final progress, table and curves, the result note, the run zip (only to the run's
    owner, also when called by its private event's index), the Model menu with the session's `model`."""
    if not run_id:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
    with user_errors():
        manager.check_owner(run_id, owner_of(service, request))
        menu = menu_update(service, model, request)
        try:
            status = manager.status(run_id)
        except StudioError:  # a run from before a restart: its folder is all there is
            zipped = zip_for_download(manager, run_id)
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), zipped, menu, gr.skip()
    download = zip_for_download(manager, run_id) if status.has_model else None
    return (
        render_progress(status),
        epoch_table(status.history),
        curves_image(status),
        result_note(status, metrics or {}),
        download,
        menu,
        render_data_check(status.run_dir),  # findings and the top-losses gallery
    )


def build(
    service: InferenceService,
    manager: TrainingManager,
    model_menu: gr.Dropdown,
    model_state: gr.State | None = None,
) -> None:
    """Create the tab's components and wire `train`, `cancel_training` and the browser's progress; every
    handler acts for the caller's owner key (`demo.lanes`)."""
    is_open = manager.limits.models is None  # a personal studio takes any timm name; a public one a list
    max_budget_min = max(MIN_BUDGET_MIN, int(min(MAX_BUDGET_MIN * 60, manager.limits.max_budget_s) // 60))
    gr.Markdown(INTRO)
    with gr.Row():
        with gr.Column(scale=1):
            source = gr.Radio(
                [ZIP_SOURCE, CLASSES_SOURCE], value=ZIP_SOURCE, label="Images", elem_id="train-source"
            )
            with gr.Group(visible=True) as zip_group:
                zip_file = gr.File(label="Zip of class folders", file_types=[".zip"], elem_id="train-zip")
            with gr.Group(visible=False) as classes_group:
                names = gr.Textbox(
                    label="Class names, comma-separated", placeholder="cat, dog", elem_id="train-class-names"
                )
                uploads = [
                    gr.File(
                        label=f"Images of class {index + 1}",
                        file_count="multiple",
                        file_types=["image"],
                        visible=index < 2,
                        elem_id=f"train-class-files-{index}",
                    )
                    for index in range(MAX_TYPED_CLASSES)
                ]
            with gr.Accordion("Options", open=True):
                model = gr.Dropdown(
                    manager.model_choices(),
                    value=DEFAULT_MODEL,
                    label="Model to start from",
                    info=f"{DEFAULT_MODEL} ships its ImageNet weights; other timm names download theirs."
                    if is_open
                    else "The models this server offers for training.",
                    allow_custom_value=is_open,
                    elem_id="train-model",
                )
                strategy = gr.Dropdown(
                    list(STRATEGIES), value="auto", label="Strategy", elem_id="train-strategy"
                )
                epochs = gr.Number(
                    0,
                    label="Epochs (0 = automatic)",
                    minimum=0,
                    maximum=MAX_EPOCHS,
                    precision=0,
                    elem_id="train-epochs-option",
                )
                budget = gr.Slider(
                    MIN_BUDGET_MIN,
                    max_budget_min,
                    value=min(DEFAULT_BUDGET_MIN, max_budget_min),
                    step=1,
                    label="Time budget (minutes)",
                    elem_id="train-budget",
                )
            with gr.Row():
                start = gr.Button("Start training", variant="primary", elem_id="train-start")
                cancel = gr.Button("Cancel", variant="stop", elem_id="train-cancel")
        with gr.Column(scale=2):
            progress = gr.HTML(elem_id="train-progress")
            data_check = gr.HTML(elem_id="train-data-check")
            table = gr.Dataframe(
                headers=EPOCH_COLUMNS,
                label="Epochs (0 = linear probe)",
                interactive=False,
                elem_id="train-epochs",
            )
            curves = gr.Image(label="Curves", type="pil", interactive=False, elem_id="train-curves")
            run_id = gr.Textbox(label="Run id", interactive=False, elem_id="train-run-id")
            metrics = gr.JSON(label="Final metrics", elem_id="train-metrics")
            note = gr.Markdown(elem_id="train-result")
            download = gr.File(label="Run folder (zip)", interactive=False, elem_id="train-download")
    classes = gr.State()
    shown_epochs = gr.State()
    timer = gr.Timer(POLL_S, active=False)
    model_state = model_state if model_state is not None else gr.State(None)

    # Closures, not partials: Gradio hands `gr.Request` only to functions whose hints it can read. The
    # parameter names are the `train` API's.
    def on_train(
        zip_file: str | None,
        model: str,
        strategy: str,
        epochs: float,
        time_budget_min: float,
        classes: list | None,
        request: gr.Request,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        owner = owner_of(service, request)
        yield from train(manager, zip_file, model, strategy, epochs, time_budget_min, classes, owner)

    def on_finish(
        run_id: str, metrics: dict | None, model: str | None, request: gr.Request
    ) -> tuple[Any, ...]:
        return finish(manager, service, run_id, metrics, model, request)

    def on_poll(run_id: str, shown_epochs: int | None, request: gr.Request) -> tuple[Any, ...]:
        return poll(manager, run_id, shown_epochs, owner_of(service, request))

    def on_cancel(run_id: str, request: gr.Request) -> str:
        return cancel_training(manager, run_id, owner_of(service, request))

    source.change(_show_source, source, [zip_group, classes_group], api_visibility="private", queue=False)
    names.change(
        _label_uploads, names, uploads, api_visibility="private", queue=False, show_progress="hidden"
    )
    start.click(
        collect_classes, [source, names, *uploads], classes, api_visibility="private", queue=False
    ).success(
        on_train,
        inputs=[zip_file, model, strategy, epochs, budget, classes],
        outputs=[run_id, metrics],
        api_name="train",
        concurrency_limit=manager.max_queued + 1,  # waiting requests hold a slot and show their position
        concurrency_id="train",
        show_progress="minimal",
    ).then(
        on_finish,
        inputs=[run_id, metrics, model_state],
        outputs=[progress, table, curves, note, download, model_menu, data_check],
        api_visibility="private",
    )
    run_id.change(_start_polling, run_id, [timer, shown_epochs], api_visibility="private", queue=False)
    timer.tick(
        on_poll,
        inputs=[run_id, shown_epochs],
        outputs=[progress, table, curves, shown_epochs, timer, data_check],
        api_visibility="private",
        queue=False,
        show_progress="hidden",
    )
    cancel.click(on_cancel, run_id, note, api_name="cancel_training", concurrency_limit=None)


def _import(manager: TrainingManager, zip_file: str | None, classes: list | None) -> ImportedDataset:
    if classes:
        return import_class_files(classes, manager.datasets_dir)
    if not zip_file:
        raise DatasetError("no zip uploaded; upload a zip with one folder of images per class.")
    return import_zip(uploaded_path(zip_file), manager.datasets_dir)


def _live(status: JobStatus) -> dict[str, Any]:
    live: dict[str, Any] = {"state": status.state, "message": public_message(status.message)}
    if status.state == QUEUED:
        live["queue_position"] = status.queue_position
    if status.history:
        live["epochs_done"] = len(status.history)
        live["val_top1"] = status.history[-1].get("val_top1")
    return live


def _milestone(status: JobStatus) -> tuple[str, int, int]:
    """What makes the API yield again: a new state, a new queue position or a finished epoch."""
    return status.state, status.queue_position, len(status.history)


def _show_source(source: str) -> tuple[Any, Any]:
    is_zip = source == ZIP_SOURCE
    return gr.Group(visible=is_zip), gr.Group(visible=not is_zip)


def _label_uploads(names_text: str) -> list[Any]:
    """One upload box per typed class name (at least two boxes), labelled with the name."""
    names = [name.strip() for name in (names_text or "").replace("\n", ",").split(",") if name.strip()]
    return [
        gr.File(
            label=f"Images of '{names[index]}'" if index < len(names) else f"Images of class {index + 1}",
            visible=index < max(2, len(names)),
        )
        for index in range(MAX_TYPED_CLASSES)
    ]


def _start_polling(run_id: str) -> tuple[Any, None]:
    return gr.Timer(active=bool(run_id)), None


def zip_for_download(manager: TrainingManager, run_id: str) -> str:
    """The run's one zip, where Gradio may serve it from (the temp folder, one subfolder per data folder),
    reused by every later download; other zips untouched for an hour are deleted."""
    data_key = hashlib.sha256(str(manager.runs_dir.resolve()).encode()).hexdigest()[:16]
    folder = DOWNLOAD_ROOT / data_key
    folder.mkdir(parents=True, exist_ok=True)
    # demo/disk_limits.py also bounds the whole folder's size
    prune_folder(folder, max_age_s=KEEP_DOWNLOADS_S, protected=[folder / f"{run_id}.zip"])
    return str(manager.zip_run(run_id, folder))
