"""TrainingManager on the real engine with a tiny model: a run end to end, queue, cancel, limits, pruning."""

from __future__ import annotations

import json
import os
import shutil
import time
import zipfile
from pathlib import Path

import pytest
from conftest import TINY_MODEL
from train_data import write_photo_classes

from demo.training_jobs import TrainingManager
from demo.training_status import CANCELLED, DONE, FAILED, QUEUED, RUNNING, TrainOptions
from finetune.checkpoint import load_run
from finetune.errors import ConfigError, StudioError

TINY_TRAIN = {"img_size": 64, "batch_size": 8, "probe_epochs": 20, "workers": 1}
TIMEOUT_S = 180


def dataset(tmp_path: Path, name: str = "data", per_class: int = 8) -> Path:
    return write_photo_classes(tmp_path / name, per_class=per_class, size=64)


def manager_for(tmp_path: Path, **kwargs) -> TrainingManager:
    return TrainingManager(
        tmp_path / "studio-data", allow_test_models=True, train_overrides=TINY_TRAIN, **kwargs
    )


def wait_for(condition, timeout_s: float = TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_job_trains_reports_progress_and_hands_over_its_model(tmp_path: Path) -> None:
    ready: list[tuple[str, Path, str]] = []
    manager = manager_for(
        tmp_path, on_model_ready=lambda rid, d: ready.append((rid, d, manager.status(rid).state))
    )
    try:
        data = dataset(tmp_path)
        run_id = manager.submit(data, ["cat", "coffee"], TrainOptions(model=TINY_MODEL, epochs=2))
        assert run_id.endswith("-cat-coffee")
        assert manager.status(run_id).queue_position == 0  # nothing ahead: it starts at once
        seen, version = [], -1
        while True:
            status = manager.wait(run_id, version, timeout_s=TIMEOUT_S)
            seen.append(status)
            version = status.version
            if status.is_finished:
                break
        assert status.state == DONE, status.error
        assert status.progress == 1.0 and status.has_model
        assert [row["phase"] for row in status.history] == ["probe", "finetune", "finetune"]
        assert status.metrics["epochs_run"] == 2
        report = json.loads((manager.runs_dir / run_id / "classification_report.json").read_text())
        assert status.metrics["val_top1"] == pytest.approx(report["weighted avg"]["recall"])  # its accuracy
        progress = [s.progress for s in seen]
        assert progress == sorted(progress) and len(set(progress)) > 3  # it moved, and never backwards
        assert {s.phase for s in seen} >= {"decode", "probe", "finetune"}
        assert ready == [(run_id, manager.runs_dir / run_id, RUNNING)]  # served before it reports done
        run_dir = manager.runs_dir / run_id
        assert load_run(run_dir).labels == ["cat", "coffee"]
        assert not data.exists()  # the manager owns and deletes the uploaded dataset
        assert not (run_dir / ".cache").exists() and not list(run_dir.glob("train_state.*"))
        names = zipfile.ZipFile(manager.zip_run(run_id, tmp_path / "zips")).namelist()
        assert {f"{run_id}/{name}" for name in ("model.safetensors", "config.json", "metrics.json")} <= set(
            names
        )
        assert f"{run_id}/curves.png" in names and f"{run_id}/README.md" in names
        assert not [name for name in names if ".cache" in name or "train_state" in name]
        assert manager.existing_runs() == [run_dir]
    finally:
        manager.close()


def test_queue_positions_and_cancel_keep_the_best_checkpoint(tmp_path: Path) -> None:
    ready: list[str] = []
    manager = manager_for(tmp_path, max_queued=2, on_model_ready=lambda rid, _: ready.append(rid))
    try:
        long = TrainOptions(model=TINY_MODEL, epochs=50, strategy="lp-ft")
        first = manager.submit(dataset(tmp_path, "a"), ["cat", "coffee"], long)
        second = manager.submit(dataset(tmp_path, "b"), ["cat", "coffee"], long)
        third = manager.submit(dataset(tmp_path, "c"), ["cat", "coffee"], long)
        assert (manager.status(second).state, manager.status(second).queue_position) == (QUEUED, 1)
        assert manager.status(second).message == "Waiting: 1 training ahead (the running one included)"
        assert manager.status(third).queue_position == 2
        with pytest.raises(StudioError, match="training queue is full"):
            manager.submit(dataset(tmp_path, "d"), ["cat", "coffee"], long)
        assert not (tmp_path / "d").exists()
        assert manager.cancel(second).state == CANCELLED and not (tmp_path / "b").exists()
        assert manager.status(third).queue_position == 1
        # Let the first job save its probe checkpoint and start fine-tuning, then cancel it mid-epoch.
        wait_for(lambda: manager.status(first).phase == "finetune")
        manager.cancel(first)
        status = manager.wait_until_finished(first, timeout_s=TIMEOUT_S)
        assert status.state == CANCELLED and status.has_model, status
        assert status.metrics["interrupted"] is True and status.metrics["epochs_run"] < 50
        assert "best checkpoint so far is kept" in status.message
        assert load_run(manager.runs_dir / first).labels == ["cat", "coffee"]
        assert ready == [first]
        wait_for(lambda: manager.status(third).state == RUNNING)
        assert manager.status(third).queue_position == 0
        manager.cancel(third)
        assert manager.wait_until_finished(third, timeout_s=TIMEOUT_S).state == CANCELLED
    finally:
        manager.close()


def test_the_time_budget_stops_a_long_run_and_keeps_its_best_checkpoint(tmp_path: Path) -> None:
    """500 epochs without early stopping take minutes; a 20 s budget (decoding included) ends the job DONE."""
    manager = TrainingManager(
        tmp_path / "studio-data", allow_test_models=True, train_overrides={**TINY_TRAIN, "patience": 1000}
    )
    try:
        options = TrainOptions(model=TINY_MODEL, strategy="lp-ft", epochs=500, time_budget_s=20)
        run_id = manager.submit(dataset(tmp_path), ["cat", "coffee"], options)
        status = manager.wait_until_finished(run_id, timeout_s=TIMEOUT_S)
        assert status.state == DONE, status.error
        assert status.message == "Stopped at the time budget; the best checkpoint so far is kept"
        assert status.metrics["interrupted"] is True and 1 <= status.metrics["epochs_run"] < 500
        assert 20 <= status.elapsed_s < 60, status
        assert load_run(manager.runs_dir / run_id).labels == ["cat", "coffee"]
    finally:
        manager.close()


def test_a_budget_spent_before_the_first_checkpoint_fails_the_job_and_keeps_nothing(tmp_path: Path) -> None:
    """No probe (strategy finetune) and 600 images: the first checkpoint needs a whole epoch, far past 1 s."""
    manager = manager_for(tmp_path)
    try:
        options = TrainOptions(model=TINY_MODEL, strategy="finetune", epochs=5, time_budget_s=1)
        run_id = manager.submit(dataset(tmp_path, per_class=300), ["cat", "coffee"], options)
        status = manager.wait_until_finished(run_id, timeout_s=TIMEOUT_S)
        assert status.state == FAILED, status
        assert "time budget (1 s) ran out before the first checkpoint" in status.error
        assert not status.has_model and not (manager.runs_dir / run_id).exists()
    finally:
        manager.close()


def test_bad_options_are_refused_before_queueing(tmp_path: Path) -> None:
    manager = TrainingManager(tmp_path / "studio-data")
    try:
        for options, message in [
            (TrainOptions(model=TINY_MODEL), "is a test model"),
            (TrainOptions(model="not_a_model"), "unknown model 'not_a_model'"),
            (TrainOptions(strategy="magic"), "invalid strategy 'magic'"),
            (TrainOptions(time_budget_s=10 * 3600), "invalid time budget"),
        ]:
            data = dataset(tmp_path)
            with pytest.raises(ConfigError, match=message):
                manager.submit(data, ["cat", "coffee"], options)
            assert not data.exists()
        assert manager.model_choices() == ["tf_efficientnet_lite0"]
        with pytest.raises(ConfigError, match="no finished run '../etc'"):
            manager.zip_run("../etc", tmp_path)
    finally:
        manager.close()


def make_runs(runs_dir: Path, template: Path, names: list[str]) -> None:
    for age, name in enumerate(reversed(names)):
        shutil.copytree(template, runs_dir / name)
        stamp = time.time() - 100 * (age + 1)
        os.utime(runs_dir / name / "config.json", (stamp, stamp))


def test_start_cleans_leftovers_and_prunes_the_oldest_runs(tmp_path: Path, untrained_run_dir: Path) -> None:
    data_dir = tmp_path / "studio-data"
    runs = data_dir / "runs"
    make_runs(runs, untrained_run_dir, ["oldest", "older", "newer", "newest"])
    (runs / "newest" / ".cache").mkdir()
    (runs / "newest" / ".cache" / "train_64.npy").write_bytes(b"\0" * 100)
    (runs / "newest" / "train_state.json").write_text(json.dumps({}))
    (runs / "crashed").mkdir()  # a run that died before its first checkpoint
    (data_dir / "datasets" / "abc" / "cat").mkdir(parents=True)
    removed: list[str] = []
    manager = TrainingManager(data_dir, max_runs=3, on_run_removed=removed.append)
    try:
        assert removed == ["oldest"]
        assert [path.name for path in manager.existing_runs()] == ["older", "newer", "newest"]
        assert not (runs / "crashed").exists() and not (data_dir / "datasets").exists()
        assert (
            not (runs / "newest" / ".cache").exists() and not (runs / "newest" / "train_state.json").exists()
        )
        run_bytes = sum(p.stat().st_size for p in (runs / "newest").rglob("*") if p.is_file())
        manager.runs.max_bytes = 2 * run_bytes
        assert manager.prune() == ["older"]
        assert [path.name for path in manager.existing_runs()] == ["newer", "newest"]
        assert removed == ["oldest", "older"]
    finally:
        manager.close()
