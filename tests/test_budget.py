"""The time budget is spent in updates: a partial epoch when a whole one does not fit, never a refusal."""

from __future__ import annotations

import numpy as np
import timm
import torch

from finetune.budget import MIN_FINETUNE_STEPS, StepCosts, affordable_steps, warmup_steps
from finetune.data import CachedImages, CachedPixels
from finetune.distributed import DistContext
from finetune.engine import EpochSettings, Optimization, Precision, train_one_epoch


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
