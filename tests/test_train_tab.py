"""The Train tab's API on the real app on 127.0.0.1, through gradio_client: train, queue, cancel, unsafe zips.

Training uses timm's tiny random-init `test_efficientnet` at 64 px (allowed by the test-only switch), so the
engine's whole path runs in seconds; one slow test trains the real default model and checks its answers.
"""

from __future__ import annotations

import json
import shutil
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import gradio as gr
import pytest
from app_server import free_port
from conftest import TINY_MODEL
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from gradio_uploads import upload_copy
from train_data import add_symlink, held_out_image, jpeg_bytes, photo_zip, write_photo_classes

import app
from demo import train_tab
from demo.service import DEFAULT_NAME, InferenceService
from demo.train_tab import CLASSES_SOURCE, ZIP_SOURCE, serve_trained_runs
from demo.training_jobs import TrainingManager

pytestmark = pytest.mark.app

TINY_TRAIN = {"img_size": 64, "batch_size": 8, "probe_epochs": 20, "workers": 1}
TIMEOUT_S = 240


@contextmanager
def train_app(
    data_dir: Path, **manager_options
) -> Iterator[tuple[Client, InferenceService, TrainingManager]]:
    """The app with its Train tab, serving the embedded model and every run it trains."""
    service = InferenceService.from_checkpoint(None)
    manager = TrainingManager(data_dir, **manager_options)
    serve_trained_runs(manager, service)
    demo = app.build_app(service, trainer=manager)
    app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
    try:
        yield Client(demo.local_url, verbose=False), service, manager
    finally:
        demo.close()
        manager.close()
        service.close()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("outside") / "studio-data"


@pytest.fixture(scope="module")
def served(data_dir: Path) -> Iterator[tuple[Client, InferenceService, TrainingManager]]:
    with train_app(data_dir, allow_test_models=True, train_overrides=TINY_TRAIN, max_queued=2) as served:
        yield served


def outputs_until(job, condition, timeout_s: float = TIMEOUT_S) -> dict:
    """The first (run id, status) a running `client.submit` job has yielded that satisfies `condition`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for run_id, status in job.outputs():
            if condition(status):
                return {"run_id": run_id, **status}
        time.sleep(0.1)
    raise AssertionError(f"no output matched; got {job.outputs()}")


def test_api_exposes_train_and_cancel_with_a_zip_and_options(served) -> None:
    client, _, _ = served
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/train", "/cancel_training", "/select_model"} <= set(endpoints)
    names = [p["parameter_name"] for p in endpoints["/train"]["parameters"]]
    assert names == ["zip_file", "model", "strategy", "epochs", "time_budget_min"]
    assert [p["component"] for p in endpoints["/train"]["returns"]] == ["Textbox", "Json"]


def test_train_through_the_api_then_classify_with_the_new_model(served, tmp_path: Path) -> None:
    client, service, manager = served
    zip_path = photo_zip(tmp_path, per_class=8, size=64)
    run_id, metrics = client.predict(handle_file(zip_path), TINY_MODEL, "auto", 2, 5, api_name="/train")
    assert metrics["state"] == "done", metrics
    assert metrics["classes"] == ["cat", "coffee"] and metrics["skipped"] == []
    assert metrics["epochs_run"] == 2
    report = json.loads((manager.runs_dir / run_id / "classification_report.json").read_text())
    assert metrics["val_top1"] == pytest.approx(report["weighted avg"]["recall"])  # the run's own accuracy
    assert metrics["dataset"].startswith("16 images in 2 classes: cat (8), coffee (8).")
    assert run_id in service.available_models()  # served as soon as it finished
    assert (manager.runs_dir / run_id / "model.safetensors").is_file()
    try:
        assert client.predict(run_id, api_name="/select_model") == run_id
        result = client.predict(
            handle_file(held_out_image("cat", tmp_path / "cat.jpg", 64)), 2, api_name="/classify"
        )
        assert {entry["label"] for entry in result["confidences"]} == {"cat", "coffee"}
    finally:
        client.predict(DEFAULT_NAME, api_name="/select_model")


def test_a_second_request_waits_with_its_queue_position_and_cancel_keeps_the_best(
    served, tmp_path: Path
) -> None:
    client, service, _ = served
    zip_path = photo_zip(tmp_path, per_class=8, size=64)
    first = client.submit(handle_file(zip_path), TINY_MODEL, "lp-ft", 50, 5, api_name="/train")
    running = outputs_until(first, lambda status: status["state"] == "running")
    second = client.submit(handle_file(zip_path), TINY_MODEL, "auto", 1, 5, api_name="/train")
    queued = outputs_until(second, lambda status: status["state"] == "queued")
    assert queued["queue_position"] == 1 and queued["run_id"] != running["run_id"]
    outputs_until(first, lambda status: status.get("epochs_done", 0) >= 1)  # the probe checkpoint is saved
    message = client.predict(running["run_id"], api_name="/cancel_training")
    assert message.startswith("Cancelling")
    run_id, metrics = first.result(timeout=TIMEOUT_S)
    assert metrics["state"] == "cancelled" and metrics["interrupted"] is True
    assert "best checkpoint so far is kept" in metrics["message"] and "val_top1" in metrics
    assert run_id in service.available_models()
    client.predict(queued["run_id"], api_name="/cancel_training")
    assert second.result(timeout=TIMEOUT_S)[1]["state"] == "cancelled"


def test_typed_class_names_with_uploads_train_through_the_tab_handlers(served, tmp_path: Path) -> None:
    _, service, manager = served
    photos = write_photo_classes(tmp_path / "photos", per_class=6, size=64)
    note = tmp_path / "notes.txt"
    note.write_text("not an image")
    uploads = [  # what the class boxes give: paths of the uploads in Gradio's cache
        [upload_copy(path) for path in sorted((photos / "cat").iterdir())],
        [*(upload_copy(path) for path in sorted((photos / "coffee").iterdir())), upload_copy(note)],
    ]
    assert train_tab.collect_classes(ZIP_SOURCE, "cat, coffee", *uploads) is None
    classes = train_tab.collect_classes(CLASSES_SOURCE, "cat, coffee", *uploads, None, None)
    assert [name for name, _ in classes] == ["cat", "coffee"]
    steps = list(train_tab.train(manager, None, TINY_MODEL, "linear", 0, 5, classes))
    run_id, metrics = steps[-1]
    assert steps[0][1]["state"] in ("queued", "running")  # the first answer comes before training ends
    assert metrics["state"] == "done" and metrics["strategy_used"] == "linear"
    assert metrics["skipped"] == [{"file": "coffee/notes.txt", "reason": "not an image file (.txt)"}]
    assert run_id in service.available_models()
    with pytest.raises(gr.Error, match="at least 2 class names"):
        train_tab.collect_classes(CLASSES_SOURCE, "cat", *uploads)


def test_runs_already_in_the_data_folder_are_served_on_start(
    tmp_path: Path, untrained_run_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "studio-data" / "runs"
    shutil.copytree(untrained_run_dir, runs / "earlier-run")
    shutil.copytree(untrained_run_dir, runs / "damaged-run")
    (runs / "damaged-run" / "config.json").write_text("{not json")
    service = InferenceService(runtime="torch")
    manager = TrainingManager(tmp_path / "studio-data")
    try:
        serve_trained_runs(manager, service)
        assert service.available_models() == ["earlier-run"]
        assert service.default_model == "earlier-run"  # the service had no model, so the first is used
        assert "Not serving run damaged-run" in caplog.text
        shutil.rmtree(runs / "damaged-run")
        shutil.copytree(untrained_run_dir, runs / "later-run")
        (runs / "later-run" / "config.json").touch()  # written after the earlier run's
        serve_trained_runs(manager, service)
        manager.runs.max_runs = 1
        assert manager.prune() == ["earlier-run"]  # pruned runs stop being served; the selection moves on
        assert service.available_models() == ["later-run"] and service.default_model == "later-run"
    finally:
        manager.close()
        service.close()


def test_app_flags_choose_the_data_folder_and_the_run_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    args = app.get_parser().parse_args([])
    assert (args.data_dir, args.max_runs, args.max_runs_gb, args.no_train) == (
        Path("studio-data"),
        20,
        5.0,
        False,
    )
    monkeypatch.setenv("STUDIO_DATA_DIR", "/srv/studio")
    monkeypatch.setenv("TRAIN_TAB", "off")
    args = app.get_parser().parse_args(["--max-runs", "3"])
    assert (args.data_dir, args.max_runs, args.no_train) == (Path("/srv/studio"), 3, True)


def write_zip(path: Path, entries: dict[str, bytes], symlink: str | None = None) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
        if symlink:
            add_symlink(archive, symlink, "/etc/passwd")
    return path


@pytest.mark.parametrize(
    ("extra", "symlink", "message"),
    [
        ({"../../evil.jpg": b"x"}, None, "points outside its folder"),
        ({}, "cat/passwd.jpg", "symbolic link"),
        ({"cat/bomb.bmp": b"\0" * (20 * 1024**2)}, None, "looks like a zip bomb"),
    ],
    ids=["traversal", "symlink", "bomb"],
)
def test_unsafe_zips_are_refused_and_nothing_is_written(
    served, data_dir: Path, tmp_path: Path, extra: dict, symlink: str | None, message: str
) -> None:
    client, _, _ = served
    good = {"cat/a.jpg": jpeg_bytes(), "coffee/a.jpg": jpeg_bytes(), "coffee/b.jpg": jpeg_bytes()}
    zip_path = write_zip(tmp_path / "upload.zip", {**good, **extra}, symlink)
    runs = data_dir / "runs"  # earlier tests' runs may still be finishing there (their ONNX export, a card)

    def written() -> list[Path]:
        return sorted(path for path in data_dir.parent.rglob("*") if runs not in (path, *path.parents))

    before = written()
    with pytest.raises(AppError, match=message):
        client.predict(handle_file(zip_path), TINY_MODEL, "auto", 1, 5, api_name="/train")
    assert written() == before  # nothing in the data folder, nothing beside it
    assert not list(data_dir.glob("datasets/*"))


@pytest.mark.slow
def test_the_default_model_learns_two_photo_classes_and_classifies_held_out_crops(tmp_path: Path) -> None:
    """The real thing: tf_efficientnet_lite0 with its embedded weights, default settings, 1 epoch."""
    with train_app(tmp_path / "studio-data") as (client, _, _):
        zip_path = photo_zip(tmp_path, per_class=10, size=160)
        run_id, metrics = client.predict(
            handle_file(zip_path), "tf_efficientnet_lite0", "auto", 1, 10, api_name="/train"
        )
        assert metrics["state"] == "done" and metrics["val_top1"] == 1.0, metrics
        client.predict(run_id, api_name="/select_model")
        for label in ("cat", "coffee"):
            image = held_out_image(label, tmp_path / f"{label}.jpg", 160)
            assert client.predict(handle_file(image), 1, api_name="/classify")["label"] == label
