"""`python -m finetune` end to end on real digits with a tiny model: run folder, resume, errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, write_digits_folder

from finetune.checkpoint import load_run, load_train_state
from finetune.config import TrainConfig
from finetune.errors import ConfigError
from finetune.trainer import fine_tune

TINY = ["--model", TINY_MODEL, "--weights", "none", "--img-size", "48", "--quiet"]


def tiny_config(data_dir: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data_dir=data_dir, out=out, model=TINY_MODEL, weights="none", img_size=48, epochs=3, batch_size=8,
        quiet=True, probe_epochs=20, patience=5,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, timeout=300,
        cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip


def test_cli_writes_a_complete_run_folder(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=15)
    (data / "digit_1" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    out = tmp_path / "run"
    result = run_cli(str(data), "--out", str(out), "--epochs", "2", "--batch-size", "8", *TINY)
    assert result.returncode == 0, result.stderr
    for name in (
        "model.safetensors", "config.json", "metrics.json", "curves.png", "confusion_matrix.png",
        "classification_report.json", "classification_report.txt", "bad_files.txt",
    ):  # fmt: skip
        assert (out / name).stat().st_size > 0, name
    assert "broken.jpg" in (out / "bad_files.txt").read_text()
    assert "Skipped 1 unreadable file" in result.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["label_names"] == ["digit_0", "digit_1", "digit_2"]
    assert config["studio"]["train_config"]["epochs"] == 2
    assert config["studio"]["dataset"]["num_bad_files"] == 1
    assert 0.0 <= config["studio"]["metrics"]["val_top1"] <= 1.0
    assert {"torch", "timm"} <= set(config["studio"]["versions"])
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["phase"] for row in epochs] == ["probe", "finetune", "finetune"]
    report = json.loads((out / "classification_report.json").read_text())
    assert set(report) >= {"digit_0", "digit_1", "digit_2", "macro avg"}
    load_run(out)


def test_resume_after_interruption_ends_where_an_uninterrupted_run_does(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=12)
    full = fine_tune(tiny_config(data, tmp_path / "full"))
    epochs_seen = []

    def stop_in_epoch_two() -> bool:
        return len(epochs_seen) >= 2  # probe row and epoch 1 done, then stop inside epoch 2

    def record(event) -> None:
        if event.kind == "epoch":
            epochs_seen.append(event.epoch)

    stopped = fine_tune(tiny_config(data, tmp_path / "cut"), on_event=record, should_stop=stop_in_epoch_two)
    assert stopped.interrupted
    assert load_train_state(tmp_path / "cut")["epoch"] == 1
    load_run(tmp_path / "cut")  # the best checkpoint so far is intact and loadable
    resumed = fine_tune(tiny_config(data, tmp_path / "cut"), resume=True)
    assert not resumed.interrupted
    assert [row["epoch"] for row in resumed.history] == [row["epoch"] for row in full.history]
    assert resumed.metrics["val_top1"] == pytest.approx(full.metrics["val_top1"])
    a = load_run(tmp_path / "full").model.state_dict()
    b = load_run(tmp_path / "cut").model.state_dict()
    assert all(torch.allclose(a[key].float(), b[key].float(), atol=1e-5) for key in a)


def test_existing_run_folder_is_not_overwritten(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=6)
    fine_tune(tiny_config(data, tmp_path / "run", strategy="linear"))
    with pytest.raises(ConfigError, match="--resume"):
        fine_tune(tiny_config(data, tmp_path / "run", strategy="linear"))


def test_linear_strategy_trains_only_the_head(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=10)
    result = fine_tune(tiny_config(data, tmp_path / "run", strategy="linear"))
    assert result.strategy_used == "linear"
    assert [row["phase"] for row in result.history] == ["probe"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{missing}", "--out", "{out}"], "does not exist"),
        (["{one_class}", "--out", "{out}"], "at least 2 class"),
        (["{data}", "--out", "{out}", "--model", "not_a_model"], "unknown model 'not_a_model'"),
        (["{data}", "--out", "{out}", "--lr", "-1"], "invalid lr"),
        (["{data}", "--out", "{out}", "--model", "resnet18"], "--weights FILE"),
        (["--resume", "{out}"], "no resumable training state"),
    ],
)
def test_cli_errors_are_one_line_with_exit_status_2(tmp_path: Path, args: list[str], message: str) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=3)
    one_class = write_digits_folder(tmp_path / "one", classes=(0,), per_class=3)
    (tmp_path / "out").mkdir()
    names = {"missing": tmp_path / "missing", "one_class": one_class, "data": data, "out": tmp_path / "out"}
    result = run_cli(*[arg.format(**names) for arg in args], "--quiet")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("error:")


def test_help_explains_every_option() -> None:
    result = run_cli("--help")
    assert result.returncode == 0
    for flag in (
        "--strategy",
        "--epochs",
        "--balance",
        "--resume",
        "--weights",
        "--img-size",
        "--quiet",
        "--ema",
    ):
        assert flag in result.stdout


@pytest.mark.slow
def test_default_model_learns_real_digits(tmp_path: Path) -> None:
    """The embedded ImageNet backbone, default recipe, a small real digits set: the model really learns."""
    data = write_digits_folder(tmp_path / "digits", classes=(3, 5, 8), per_class=30, size=64)
    result = fine_tune(TrainConfig(data_dir=data, out=tmp_path / "run", epochs=2, quiet=True))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["architecture"] == "tf_efficientnet_lite0"
    assert config["studio"]["weights_source"].startswith("embedded:")
    assert config["data_config"]["input_size"] == [
        3,
        128,
        128,
    ]  # 64 px digits train at about twice their size
    assert result.metrics["val_top1"] >= 0.85  # 3 classes: chance is 0.33


def test_ctrl_c_saves_and_exits_cleanly_with_a_resume_hint(tmp_path: Path) -> None:
    import signal
    import time

    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=16)
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", str(data), "--out", str(out), "--epochs", "200",
         "--batch-size", "4", "--patience", "200", *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1],
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "train_state.json").exists() or load_train_state(out)["epoch"] < 1:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training never finished an epoch"
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Continue with: python -m finetune --resume" in stderr
    assert "Traceback" not in stderr
    assert load_train_state(out)["epoch"] >= 1
    load_run(out)


def test_imbalanced_classes_get_a_weighted_loss_and_ema_runs(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=20)
    for extra in sorted((data / "digit_1").iterdir())[5:]:
        extra.unlink()
    result = fine_tune(tiny_config(data, tmp_path / "run", epochs=1, ema=True))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["studio"]["balance_used"] == "loss"
    assert config["studio"]["dataset"]["class_counts"] == {"digit_0": 16, "digit_1": 4}
    assert result.metrics["val_top1"] >= 0.0
    sampled = fine_tune(tiny_config(data, tmp_path / "sampled", epochs=1, balance="sampler"))
    assert (
        json.loads((tmp_path / "sampled" / "config.json").read_text())["studio"]["balance_used"] == "sampler"
    )
    assert sampled.history[-1]["train_loss"] > 0
