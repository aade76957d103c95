"""`python -m finetune` end to end on real digits with a tiny model: run folder, resume, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, write_digits_folder

from finetune.checkpoint import load_run, load_train_state
from finetune.config import TrainConfig
from finetune.errors import CheckpointError, ConfigError, DatasetError
from finetune.evaluate import evaluate_folder
from finetune.precision import resolve_precision, training_precision
from finetune.split import SPLIT_FILE, read_split
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
    # 46 files, 20% would be 9: --val-max-images 6 holds out a smaller share (2 of each class) instead
    flags = ("--epochs", "2", "--batch-size", "8", "--augment", "off", "--val-max-images", "6")
    result = run_cli(str(data), "--out", str(out), *flags, *TINY)
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
    assert config["studio"]["plan"]["augment"] == {
        "jitter": False, "hflip": False, "trunk_shift": False, "reason": "--augment off",
    }  # fmt: skip
    # the recipe plan (finetune/recipe.py): a given size is kept; few images train the whole backbone
    assert (config["studio"]["plan"]["image_size"], config["studio"]["plan"]["frozen_groups"]) == (48, 0)
    assert config["studio"]["dataset"]["num_bad_files"] == 1
    # training steps in the precision the rule gives this CPU; the probe and evaluation in the run's own
    evaluation = resolve_precision("auto", torch.device("cpu"))
    assert config["studio"]["precision"] == evaluation.name
    assert config["studio"]["train_precision"] == training_precision(evaluation, "auto", 48).name
    metrics = config["studio"]["metrics"]
    assert {"torch", "timm"} <= set(config["studio"]["versions"])
    epochs = json.loads((out / "metrics.json").read_text())["epochs"]
    assert [row["phase"] for row in epochs] == ["probe", "finetune", "finetune"]
    report = json.loads((out / "classification_report.json").read_text())
    assert set(report) >= {"digit_0", "digit_1", "digit_2", "macro avg"}
    assert metrics["val_top1"] == pytest.approx(report["weighted avg"]["recall"])  # the same predictions
    assert metrics["val_macro_f1"] == pytest.approx(report["macro avg"]["f1"])
    # the stored score is what finetune.evaluate reproduces from the saved files on the recorded val split
    evaluated, _, _ = evaluate_folder(data, str(out))
    assert evaluated["subset"] == "val" and evaluated["n"] == config["studio"]["dataset"]["num_val"] == 6
    assert evaluated["top1"] == pytest.approx(metrics["val_top1"])
    assert "(validation: used to choose the kept weights)" in result.stdout
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
    reason = json.loads((tmp_path / "run" / "config.json").read_text())["studio"]["plan"]["reason"]
    assert "head trained alone" in reason and "whole backbone" not in reason  # what ran, not what would have


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
    # 72 training images (<= recipe.FEW_IMAGES): the native 224 px and the whole backbone (finetune/recipe.py)
    assert config["data_config"]["input_size"] == [3, 224, 224]
    assert config["studio"]["plan"]["frozen_groups"] == 0
    assert result.metrics["val_top1"] >= 0.85  # 3 classes: chance is 0.33


def _saved_epoch(out: Path) -> int:
    """The last epoch of the run's saved state; 0 before the first save and while one is being written (its
    two files are replaced one after the other, and a read between them sees a torn state)."""
    try:
        return load_train_state(out)["epoch"]
    except CheckpointError:
        return 0


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
    while _saved_epoch(out) < 1:
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


def test_imbalanced_classes_get_a_weighted_loss_and_the_sampler_reaches_the_probe(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=20)
    for extra in sorted((data / "digit_1").iterdir())[5:]:
        extra.unlink()
    fine_tune(tiny_config(data, tmp_path / "run", strategy="linear"))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["studio"]["balance_used"] == "loss"
    assert config["studio"]["dataset"]["class_counts"] == {"digit_0": 16, "digit_1": 4}
    fine_tune(tiny_config(data, tmp_path / "sampled", strategy="linear", balance="sampler"))
    sampled = json.loads((tmp_path / "sampled" / "config.json").read_text())
    assert sampled["studio"]["balance_used"] == "sampler"
    fine_tune(tiny_config(data, tmp_path / "plain", strategy="linear", balance="none"))
    heads = {
        name: load_run(tmp_path / name).model.get_classifier().weight for name in ("run", "sampled", "plain")
    }
    # the same features and seed: only the balancing differs, and each one changes the probe
    assert (heads["sampled"] - heads["plain"]).abs().max() > 1e-3
    assert (heads["run"] - heads["plain"]).abs().max() > 1e-3


def test_ema_warms_up_and_changes_the_weights_it_saves(tmp_path: Path) -> None:
    """Saved EMA weights differ from plain training's, and follow training instead of staying at the start.

    Without warmup, a decay of 0.998 over these 21 updates keeps ~96% of the first update's weights; with
    warmup the average covers the last several updates.
    """
    from finetune.modeling import create_model_and_transforms

    data = write_digits_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=12)
    # 4 of the tiny model's 7 groups frozen: auto would train all of them on so few images
    options = dict(strategy="finetune", epochs=3, batch_size=4, patience=10, frozen_groups=4)
    fine_tune(tiny_config(data, tmp_path / "plain", **options))
    fine_tune(tiny_config(data, tmp_path / "ema", ema=True, **options))
    plain = load_run(tmp_path / "plain")
    ema = load_run(tmp_path / "ema")
    assert ema.studio["train_config"]["ema"] and ema.studio["metrics"]["best_epoch"] >= 1
    torch.manual_seed(0)  # as the trainer does: the starting weights of both runs
    start = create_model_and_transforms(TINY_MODEL, 3, "none").model.state_dict()
    trained = [name for name, p in plain.model.named_parameters() if not torch.equal(p, start[name])]
    frozen = [name for name, _ in plain.model.named_parameters() if name not in trained]
    assert trained and frozen  # the first 4 layer groups stay frozen, the rest trains
    assert plain.studio["plan"]["frozen_groups"] == 4

    def distance(a: dict, b: dict) -> float:
        return sum(float((a[name] - b[name]).float().norm() ** 2) for name in trained) ** 0.5

    plain_weights, ema_weights = plain.model.state_dict(), ema.model.state_dict()
    assert distance(ema_weights, plain_weights) > 0.05 * distance(plain_weights, start)
    assert distance(ema_weights, start) > 0.5 * distance(plain_weights, start)
    assert all(torch.equal(ema_weights[name], start[name]) for name in frozen)


def test_resume_refuses_a_dataset_that_changed_since_the_run_started(tmp_path: Path) -> None:
    """One file added to a class would reshuffle its split: resume says what changed instead of leaking."""
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=12)
    out = tmp_path / "run"
    epochs_seen: list[int] = []
    stopped = fine_tune(
        tiny_config(data, out),
        on_event=lambda event: epochs_seen.append(event.epoch) if event.kind == "epoch" else None,
        should_stop=lambda: len(epochs_seen) >= 2,
    )
    assert stopped.interrupted
    recorded = (out / SPLIT_FILE).read_bytes()
    val_before = {s.path for s in read_split(out).to_split().val}
    added = data / "digit_0" / "new.png"
    shutil.copy(data / "digit_1" / "000.png", added)
    result = run_cli("--resume", str(out), "--quiet")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: the dataset")
    assert "changed since this run started: 1 file(s) added (digit_0/new.png)" in result.stderr
    assert (
        f"start a new run on the dataset as it is now: python -m finetune {data} --out NEW_RUN_DIR"
        in result.stderr
    )
    with pytest.raises(DatasetError, match="1 file\\(s\\) added"):
        fine_tune(tiny_config(data, out), resume=True)
    added.unlink()  # restored: the run continues on exactly the images it started with
    resumed = fine_tune(tiny_config(data, out), resume=True)
    assert not resumed.interrupted and (out / SPLIT_FILE).read_bytes() == recorded
    config = json.loads((out / "config.json").read_text())
    assert config["studio"]["dataset"]["num_val"] == len(val_before) == 4
    evaluated, _, _ = evaluate_folder(data, str(out))
    assert evaluated["subset"] == "val" and evaluated["n"] == 4  # the recorded validation images


def test_train_and_test_folders_report_test_metrics_beside_validation(tmp_path: Path) -> None:
    """train/ + test/: validation is split out of train/, test/ is scored once at the end and reported."""
    data = tmp_path / "digits"
    write_digits_folder(data / "train", classes=(0, 1, 2), per_class=12)
    write_digits_folder(data / "test", classes=(0, 1, 2), per_class=4)
    (data / "test" / "digit_2" / "003.png").write_bytes(b"not a png")  # reported like any bad file
    out = tmp_path / "run"
    result = run_cli(str(data), "--out", str(out), "--epochs", "1", "--batch-size", "8", *TINY)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    dataset, metrics = config["studio"]["dataset"], config["studio"]["metrics"]
    assert config["label_names"] == ["digit_0", "digit_1", "digit_2"]  # not "test" and "train"
    assert dataset["layout"] == "train+test" and (dataset["num_train"], dataset["num_val"]) == (30, 6)
    assert dataset["num_test"] == metrics["num_test"] == 11
    saved = json.loads((out / SPLIT_FILE).read_text())["files"]
    assert {f["subset"] for f in saved if f["path"].startswith("test/")} == {"test"}
    assert {f["subset"] for f in saved if f["path"].startswith("train/")} == {"train", "val"}
    report = json.loads((out / "test_classification_report.json").read_text())
    assert metrics["test_top1"] == pytest.approx(report["weighted avg"]["recall"])
    assert metrics["test_macro_f1"] == pytest.approx(report["macro avg"]["f1"])
    assert metrics["selected_on"].startswith("validation")
    evaluated, _, _ = evaluate_folder(data, str(out))  # the run's own folder: its test split only
    assert (evaluated["subset"], evaluated["n"]) == ("test", 11)
    assert evaluated["top1"] == pytest.approx(metrics["test_top1"])
    assert "Test (test/ folder, 11 images, never used for training or choosing): top-1 " in result.stdout
    card = (out / "README.md").read_text()
    assert "## Results on the test set" in card and "These images chose the kept weights" in card
    assert "test/digit_2/003.png" in (out / "bad_files.txt").read_text()


def test_class_warnings_name_classes_without_validation_images_or_with_one_image(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=6)
    for extra in sorted((data / "digit_2").iterdir())[1:]:
        extra.unlink()
    messages: list[str] = []
    fine_tune(
        tiny_config(data, tmp_path / "run", strategy="linear"),
        on_event=lambda event: messages.append(event.message) if event.kind == "status" else None,
    )
    warnings = json.loads((tmp_path / "run" / "config.json").read_text())["studio"]["dataset"]["warnings"]
    assert len(warnings) == 2
    assert warnings[0].startswith("class(es) 'digit_2' have no validation image")
    assert warnings[1].startswith("class(es) 'digit_2' have a single image")
    assert [m for m in messages if m.startswith("Warning: ")] == [f"Warning: {w}" for w in warnings]
    report = json.loads((tmp_path / "run" / "classification_report.json").read_text())
    assert report["digit_2"]["support"] == 0
    supported = [report[name]["f1"] for name in ("digit_0", "digit_1")]
    assert report["macro avg"]["f1"] == pytest.approx(sum(supported) / 2)
    evaluated, _, _ = evaluate_folder(data, str(tmp_path / "run"))  # the recorded validation images
    assert evaluated["classes_without_images"] == ["digit_2"]
    assert evaluated["per_class"]["macro avg"]["f1"] == pytest.approx(report["macro avg"]["f1"])


def test_the_time_budget_and_wall_time_count_decoding(tmp_path: Path) -> None:
    """A slow decode (3 s, simulated in the progress callback) uses up a 2 s budget: auto keeps the probe."""
    import time

    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=8)
    slept: list[float] = []

    def slow_decoding(event) -> None:
        if event.kind == "cache" and not slept:
            time.sleep(3.0)
            slept.append(3.0)

    started = time.perf_counter()
    result = fine_tune(
        tiny_config(data, tmp_path / "run", strategy="auto", epochs=0, time_budget_s=2),
        on_event=slow_decoding,
    )
    total = time.perf_counter() - started
    assert slept and result.strategy_used == "linear"
    assert [row["phase"] for row in result.history] == ["probe"]
    assert result.history[0]["elapsed_s"] >= 3.0
    assert 3.0 <= result.metrics["wall_s"] <= total


def test_progress_bars_redraw_a_few_times_not_once_per_image(capsys: pytest.CaptureFixture[str]) -> None:
    from finetune.__main__ import ProgressBars
    from finetune.engine import TrainEvent

    bars = ProgressBars(enabled=True)
    images = 20_000
    for done in range(1, images + 1):
        bars(TrainEvent("cache", phase="train", step=done, steps=images))
    for step in range(1, 51):
        bars(
            TrainEvent(
                "step",
                phase="finetune",
                epoch=1,
                epochs=1,
                step=step,
                steps=50,
                metrics={"loss": 0.5, "acc": 0.9},
            )
        )
    bars.close()
    log = capsys.readouterr().err
    assert log.count("\r") < 200  # a forced redraw per event wrote 20,000 frames
    assert "50/50" in log and "acc=0.900" in log  # the epoch bar that stays ends at its total
