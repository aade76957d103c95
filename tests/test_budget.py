"""The time budget is spent in updates: a partial epoch when a whole one does not fit, never a refusal."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_MODEL, write_digits_folder

from finetune import budget, trainer
from finetune.augment import normalize
from finetune.budget import (
    CLOCK_SKIP,
    CLOCK_STEPS,
    MIN_FINETUNE_STEPS,
    BudgetCosine,
    StepCosts,
    UpdateSchedule,
    affordable_steps,
    warmup_steps,
)
from finetune.config import TrainConfig
from finetune.distributed import DistContext
from finetune.engine import EpochSettings, Optimization, train_one_epoch
from finetune.pixel_cache import CachedImages, CachedPixels
from finetune.precision import Precision
from finetune.trainer import fine_tune


def test_whole_epochs_fit_when_the_budget_allows() -> None:
    costs = StepCosts(step_s=1.0, eval_s=5.0, final_s=10.0)
    # 3 epochs of 10 updates with a validation pass each: 3 * (10 + 5) = 45 s, plus 10 s at the end
    assert affordable_steps(55.0, costs, steps_per_epoch=10, wanted_steps=30) == 30
    assert affordable_steps(1000.0, costs, steps_per_epoch=10, wanted_steps=30) == 30  # not above


def test_a_large_dataset_gets_the_updates_of_a_partial_epoch() -> None:
    """One epoch of 1,500 updates at 0.5 s does not fit 600 s: the plan keeps what does, not zero."""
    costs = StepCosts(step_s=0.5, eval_s=60.0, final_s=100.0)
    steps = affordable_steps(600.0, costs, steps_per_epoch=1500, wanted_steps=6000)
    assert steps == int((600 - 100 - 60) / 0.5) == 880
    assert steps >= MIN_FINETUNE_STEPS


def test_a_second_epoch_is_only_started_when_updates_fit_beside_its_validation() -> None:
    costs = StepCosts(step_s=1.0, eval_s=5.0)
    assert affordable_steps(15.0 + 5.0, costs, steps_per_epoch=10, wanted_steps=30) == 10
    assert affordable_steps(15.0 + 8.0, costs, steps_per_epoch=10, wanted_steps=30) == 13


def test_updates_already_made_count_and_the_rest_of_their_epoch_is_priced() -> None:
    costs = StepCosts(step_s=1.0, eval_s=5.0)
    # 4 updates done inside the first epoch: 6 more end it (6 + 5 s), then 4 of the next (4 + 5 s)
    assert affordable_steps(20.0, costs, steps_per_epoch=10, wanted_steps=30, done_steps=4) == 14
    assert affordable_steps(0.0, costs, steps_per_epoch=10, wanted_steps=30, done_steps=4) == 4


def test_warmup_is_an_epoch_but_never_most_of_a_short_run() -> None:
    assert warmup_steps(total_steps=186, steps_per_epoch=31, warmup_epochs=1.0) == 31
    assert warmup_steps(total_steps=880, steps_per_epoch=1500, warmup_epochs=1.0) == 176


def _group_lr(scheduler: BudgetCosine, update: int) -> float:
    scheduler.step_update(num_updates=update)
    return scheduler.optimizer.param_groups[0]["lr"]


def test_a_longer_plan_after_the_warmup_continues_the_decay_without_a_jump() -> None:
    """Re-planned from 100 to 150 updates at update 60: the rate at 60 is unchanged, it never rises again,
    and it reaches the same floor at 150 (a rebuilt cosine would have jumped up at 60)."""
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = UpdateSchedule(optimizer, lr=1.0, steps_per_epoch=10, warmup_epochs=1.0)
    scheduler = schedule.build(100)
    before = _group_lr(scheduler, 60)
    rebuilt = _group_lr(schedule.build(150), 60)
    scheduler = schedule.refit(scheduler, total=150, done=60)
    assert _group_lr(scheduler, 60) == pytest.approx(before) and rebuilt > before * 1.5
    rates = [_group_lr(scheduler, update) for update in range(60, 151)]
    assert all(later <= earlier + 1e-12 for earlier, later in zip(rates, rates[1:], strict=False))
    assert rates[-1] == pytest.approx(0.01) and rates[45] > 0.01 * 2  # the floor at 150, not before
    shorter = schedule.refit(scheduler, total=120, done=90)  # a shorter plan later: still continuous
    assert _group_lr(shorter, 90) == pytest.approx(rates[30])
    assert _group_lr(shorter, 120) == pytest.approx(0.01)


def test_a_plan_changed_during_the_warmup_rebuilds_it_and_the_anchor_survives_a_json_resume() -> None:
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=1.0)
    schedule = UpdateSchedule(optimizer, lr=1.0, steps_per_epoch=50, warmup_epochs=1.0)
    scheduler = schedule.build(100)  # warmup: 20% of 100 updates
    assert scheduler.warmup_t == 20
    scheduler = schedule.refit(scheduler, total=200, done=5)
    assert scheduler.warmup_t == 40 and scheduler.anchor_t is None
    scheduler = schedule.refit(scheduler, total=150, done=80)
    state = json.loads(json.dumps(scheduler.state_dict()))
    resumed = schedule.build(999)
    resumed.load_state_dict(state)
    updates = (80, 120, 150)
    assert [_group_lr(resumed, u) for u in updates] == [_group_lr(scheduler, u) for u in updates]


def test_train_one_epoch_stops_at_the_planned_last_update() -> None:
    """The run's plan ends inside the epoch: exactly max_updates updates are made, and it is no stop."""
    generator = np.random.default_rng(0)
    pixels = generator.integers(0, 255, size=(40, 3, 32, 32), dtype=np.uint8)
    data = CachedImages(CachedPixels(pixels, np.arange(40)), torch.arange(40) % 2, [])
    model = timm.create_model("test_efficientnet", num_classes=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    steps_done: list[int] = []

    class Schedule:
        def step_update(self, num_updates: int) -> None:
            steps_done.append(num_updates)

    opt = Optimization(optimizer, Schedule(), torch.nn.CrossEntropyLoss(), max_updates=3)
    settings = EpochSettings(
        precision=Precision(torch.device("cpu"), None), dist=DistContext(), mean=(0.5,) * 3, std=(0.5,) * 3,
        batch_size=4,
    )  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    _, updates, stopped = train_one_epoch(model, data, settings, opt, epoch=1)
    assert (updates, stopped, steps_done) == (3, False, [1, 2, 3])
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def _tiny_run(data: Path, out: Path, budget_s: float, **overrides: object) -> TrainConfig:
    values = dict(
        data_dir=data, out=out, model=TINY_MODEL, weights="none", img_size=48, batch_size=8, quiet=True,
        probe_epochs=5, patience=20, time_budget_s=budget_s,
    )  # fmt: skip
    return TrainConfig(**{**values, **overrides})


def test_a_budget_shorter_than_the_planned_epochs_ends_inside_an_epoch(tmp_path: Path) -> None:
    """Slow updates (0.25 s, slept in the progress callback): the measured step time shrinks the plan
    to the updates that fit, ending inside an epoch, instead of running all 9 planned epochs or none."""
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=100)

    def slow_updates(event) -> None:  # noqa: ANN001
        if event.kind == "step" and event.phase == "finetune":
            time.sleep(0.25)

    started = time.perf_counter()
    result = fine_tune(_tiny_run(data, tmp_path / "run", budget_s=40), on_event=slow_updates)
    total = time.perf_counter() - started
    finetune_rows = [row for row in result.history if row["phase"] == "finetune"]
    steps_per_epoch = 160 // 8
    wanted = 9 * steps_per_epoch  # about TARGET_STEPS updates in whole epochs
    updates = finetune_rows[-1]["updates"]
    assert CLOCK_SKIP + CLOCK_STEPS <= updates < wanted
    assert len(finetune_rows) == -(-updates // steps_per_epoch)  # every started epoch was validated
    assert result.metrics["wall_s"] <= total


def test_a_plan_made_on_slow_first_updates_grows_when_later_ones_are_faster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The first updates are slow (0.3 s), the rest fast (0.02 s): the plan made on the first ones is
    re-fitted on the later ones and grows, so the budget is spent instead of left over."""
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=100)
    # re-plans after 2, 4, 8... timed updates (a short run)
    monkeypatch.setattr(budget, "CLOCK_STEPS", 2)
    monkeypatch.setattr(budget, "CLOCK_GROWTH", 2)
    steps: list[int] = []

    def slow_start(event) -> None:  # noqa: ANN001
        if event.kind == "step" and event.phase == "finetune":
            steps.append(event.step)
            time.sleep(0.3 if len(steps) <= CLOCK_SKIP + 2 else 0.02)

    caplog.set_level("INFO", logger="finetune.budget")
    result = fine_tune(_tiny_run(data, tmp_path / "run", budget_s=25, warmup_epochs=5), on_event=slow_start)
    pattern = re.compile(r"planning (\d+) updates instead of (\d+)")
    matches = [pattern.search(record.getMessage()) for record in caplog.records]
    plans = [(int(m.group(2)), int(m.group(1))) for m in matches if m]  # (old, new)
    first_plan = plans[0][1]
    assert first_plan < 9 * 20, "the slow first updates must have cut the plan below the wanted 9 epochs"
    assert any(new > old for old, new in plans[1:]), plans
    updates = [row for row in result.history if row["phase"] == "finetune"][-1]["updates"]
    assert updates > first_plan


def test_the_probe_samples_training_images_when_their_features_do_not_fit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A decode that eats the budget (3 s of 2): the probe fits on a random sample of MIN_PROBE_IMAGES."""
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=60)
    monkeypatch.setattr(trainer, "MIN_PROBE_IMAGES", 12)  # the floor, scaled to a 96-image training set
    slept: list[bool] = []

    def slow_decoding(event) -> None:  # noqa: ANN001
        if event.kind == "cache" and not slept:
            time.sleep(3.0)
            slept.append(True)

    result = fine_tune(_tiny_run(data, tmp_path / "run", budget_s=2), on_event=slow_decoding)
    studio = json.loads((tmp_path / "run" / "config.json").read_text())["studio"]
    assert studio["probe_images"] == 12 and studio["dataset"]["num_train"] == 96
    assert result.strategy_used == "linear"


def test_a_set_whose_cache_does_not_fit_streams_from_the_files_and_trains_the_same(tmp_path: Path) -> None:
    """--cache-max-gb below the decoded size: no .npy is written, batches are decoded by worker processes,
    a bad file is still listed, and the run matches a cached one step for step (same pixels, same seed)."""
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=12)
    (data / "digit_0" / "broken.png").write_bytes(b"not a png")
    cached = fine_tune(_tiny_run(data, tmp_path / "cached", 900, epochs=2, strategy="lp-ft"))
    streamed = fine_tune(
        _tiny_run(data, tmp_path / "streamed", 900, epochs=2, strategy="lp-ft", cache_max_gb=1e-6)
    )
    assert not list((tmp_path / "streamed" / ".cache").glob("*.npy"))
    assert list((tmp_path / "cached" / ".cache").glob("*.npy"))
    (verdicts_file,) = (tmp_path / "streamed" / ".cache").glob("train_48_crop*.json")  # size and crop
    verdicts = json.loads(verdicts_file.read_text())
    assert verdicts["streamed"] is True
    assert [path.name for path, _ in streamed.bad_files] == ["broken.png"]
    assert [row["val_loss"] for row in streamed.history] == pytest.approx(
        [row["val_loss"] for row in cached.history], abs=1e-5
    )
    assert [row["train_loss"] for row in streamed.history] == pytest.approx(
        [row["train_loss"] for row in cached.history], abs=1e-5
    )


def test_training_without_jitter_feeds_the_cached_pixels_as_they_are_and_flips_only_when_asked() -> None:
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 255, size=(16, 3, 32, 32), dtype=np.uint8))
    data = CachedImages(CachedPixels(pixels.numpy(), np.arange(16)), torch.arange(16) % 2, [])
    mean, std = (0.5,) * 3, (0.25,) * 3

    def key(image: torch.Tensor) -> tuple[float, ...]:
        return tuple(image.flatten()[:64].tolist())

    as_stored = {key(image) for image in normalize(pixels, mean, std)}
    mirrored = {key(image) for image in normalize(pixels.flip(-1), mean, std)}

    class Recording(torch.nn.Module):  # a real model that keeps what it was fed
        def __init__(self) -> None:
            super().__init__()
            self.model = timm.create_model("test_efficientnet", num_classes=2)
            self.seen: list[torch.Tensor] = []

        def forward(self, inputs: torch.Tensor) -> torch.Tensor:
            self.seen.extend(inputs.detach().clone())
            return self.model(inputs)

    def fed(**flags: bool) -> list[tuple[float, ...]]:
        model = Recording()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        opt = Optimization(optimizer, _NoSchedule(), torch.nn.CrossEntropyLoss())
        cpu = Precision(torch.device("cpu"), None)
        settings = EpochSettings(cpu, DistContext(), mean, std, batch_size=8, **flags)
        train_one_epoch(model, data, settings, opt, epoch=1)
        return [key(image) for image in model.seen]

    assert sorted(fed(jitter=False)) == sorted(as_stored)
    flipped = fed(jitter=False, hflip=True)
    assert all(image in as_stored or image in mirrored for image in flipped)
    assert any(image in mirrored for image in flipped) and any(image in as_stored for image in flipped)
    assert not any(image in as_stored for image in fed())  # the default jitters every image


class _NoSchedule:
    def step_update(self, num_updates: int) -> None:
        pass
