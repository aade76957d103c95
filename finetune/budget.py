"""How many fine-tuning updates fit the time budget: the budget is spent in steps, not refused by epochs.

Deciding in whole epochs made a large dataset keep the linear probe (issue 19: 60,000 Fashion-MNIST images,
an estimated 566 s an epoch against a 900 s budget, 87.3%): a fraction of an epoch of fine-tuning already
beats the probe. So the plan counts updates: full epochs while they fit, then the updates of a last partial
epoch, each epoch followed by its validation pass, with the closing evaluation kept aside. The cosine
schedule then decays over exactly those updates (`finetune.trainer` re-fits the count as it measures the
real step time, so a wrong first estimate or a machine that changes speed costs seconds, not the budget).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from timm.scheduler import CosineLRScheduler

logger = logging.getLogger(__name__)

MIN_FINETUNE_STEPS = 20  # fewer updates than this cannot move a probe-initialised network: keep the probe
WARMUP_SHARE = 0.2  # warmup takes at most this share of the updates a run can afford
CLOCK_SKIP, CLOCK_STEPS = 3, 10  # updates left untimed (allocator, caches), then timed, before re-planning
CLOCK_GROWTH = 4  # later re-plans after 4x as many timed updates (40, 160, 640...)
REPLAN_NOTE_SHARE = 0.02  # re-plans that change the update count by less than this are logged at DEBUG only


@dataclass(frozen=True)
class StepCosts:
    """Seconds of the parts of a fine-tuning run, as measured (or estimated) on this machine."""

    step_s: float  # one training update of the global batch
    eval_s: float  # one validation pass, run after each epoch (also after a partial last one)
    final_s: float = 0.0  # the closing evaluation(s) of the kept model (validation, then test/)


def affordable_steps(
    remaining_s: float, costs: StepCosts, steps_per_epoch: int, wanted_steps: int, done_steps: int = 0
) -> int:
    """The total updates (counting the `done_steps` already made, at most `wanted_steps`) that fit.

    Every started epoch pays its validation pass, so a partial epoch is only worth starting when some
    updates fit beside that pass.
    """
    left = remaining_s - costs.final_s
    steps = done_steps
    step_s = max(costs.step_s, 1e-9)
    while steps < wanted_steps:
        to_epoch_end = steps_per_epoch - steps % steps_per_epoch
        chunk = min(to_epoch_end, wanted_steps - steps)
        cost = chunk * step_s + costs.eval_s
        if cost <= left:
            steps += chunk
            left -= cost
            continue
        steps += max(0, min(chunk, int((left - costs.eval_s) / step_s)))
        break
    return steps


def warmup_steps(total_steps: int, steps_per_epoch: int, warmup_epochs: float) -> int:
    """`warmup_epochs` of updates, but never more than WARMUP_SHARE of a run cut short by the budget."""
    return max(0, min(int(warmup_epochs * steps_per_epoch), int(total_steps * WARMUP_SHARE)))


class BudgetCosine(CosineLRScheduler):
    """timm's warmup + cosine over updates, whose end can move while it runs.

    The budget's plan changes its number of updates as it measures the machine. Rebuilding timm's cosine
    over a new count makes the learning rate jump (a longer plan moves it back up), so a plan changed after
    the warmup re-anchors instead: from the update it is changed at, the rate decays from its current value
    to the same floor over the updates left. The anchor is plain numbers in `state_dict()`: a resume keeps it.
    """

    anchor_t: int | None = None
    anchor_values: list[float] | None = None

    def retarget(self, total: int, done: int) -> None:
        """End the decay at update `total` instead, continuing from the rate of update `done`."""
        self.anchor_values = self._get_lr(done)
        self.anchor_t = done
        self.t_initial = max(done + 1, total)

    def _get_lr(self, t: int) -> list[float]:
        if self.anchor_t is None or self.anchor_values is None or t < self.anchor_t:
            return super()._get_lr(t)
        progress = min(1.0, (t - self.anchor_t) / max(1, self.t_initial - self.anchor_t))
        decay = 0.5 * (1 + math.cos(math.pi * progress))
        return [self.lr_min + (value - self.lr_min) * decay for value in self.anchor_values]


class UpdateSchedule:
    """The warmup + cosine of a run whose update count the budget may change (`refit`) while it trains."""

    def __init__(self, optimizer: Any, lr: float, steps_per_epoch: int, warmup_epochs: float) -> None:
        self.optimizer, self.lr = optimizer, lr
        self.steps_per_epoch, self.warmup_epochs = steps_per_epoch, warmup_epochs

    def build(self, total: int) -> BudgetCosine:
        return BudgetCosine(
            self.optimizer, t_initial=max(1, total), lr_min=self.lr * 0.01,
            warmup_t=warmup_steps(total, self.steps_per_epoch, self.warmup_epochs),
            warmup_lr_init=self.lr * 0.01, t_in_epochs=False,
        )  # fmt: skip

    def refit(self, scheduler: BudgetCosine, total: int, done: int) -> BudgetCosine:
        """The schedule for `total` updates, `done` of them made: rebuilt while the warmup (which depends on
        `total`) lasts, re-anchored after it."""
        if done < scheduler.warmup_t and scheduler.anchor_t is None:
            scheduler = self.build(total)
        else:
            scheduler.retarget(total, done)
        scheduler.step_update(num_updates=done)
        return scheduler


class StepClock:
    """Times real updates, then fits the plan to the budget left: while each epoch runs, and after it.

    The first plan guessed the update time from the probe's forward passes; a backward pass through a half
    frozen or a small-image network costs more or less than the trainer's guess, and a shared machine
    changes speed, so the count is re-fitted on the updates timed since the last validation (after 10, 40,
    160, 640 of them in the first epoch, 40, 160, 640 in the next) and after each validation, with its
    measured time. The schedule follows without a jump (`BudgetCosine`). Measured on Fashion-MNIST's default
    run (1,200 s): planned once on its first 10 (slow) updates, then only shrunk, it left 97 s unspent; shrunk
    on a cumulative average while the machine sped up from 196 to 239 img/s, 136 s.

    `remaining_s()` is the budget left, `costs(step_s)` prices validation and the closing passes beside an
    update of `step_s`, and `agree` makes every process use rank 0's count (timings differ between them).
    """

    def __init__(
        self,
        opt: Any,  # finetune.engine.Optimization: its max_updates and scheduler are re-fitted
        schedule: UpdateSchedule,
        wanted: int,
        done: int,
        remaining_s: Callable[[], float],
        costs: Callable[[float], StepCosts],
        agree: Callable[[int], int] = lambda count: count,
    ) -> None:
        self.opt, self.schedule, self.wanted = opt, schedule, wanted
        self.remaining_s, self.costs, self.agree = remaining_s, costs, agree
        self.ticks, self.done_at_start = 0, done
        self.last: float | None = None
        self.spent, self.timed = 0.0, 0  # since the last validation
        self.eval_s: float | None = None
        self.next_replan = CLOCK_STEPS

    def tick(self) -> None:
        """One update was made."""
        now = time.perf_counter()
        self.ticks += 1
        if self.last is not None and self.ticks > CLOCK_SKIP:
            self.spent += now - self.last
            self.timed += 1
        self.last = now
        if self.timed == self.next_replan:
            self.next_replan *= CLOCK_GROWTH
            self.replan(self.done_at_start + self.ticks)

    def evaluated(self, seconds: float, done: int) -> None:
        """A validation pass (and its checkpoint) took `seconds`, not an update's time: re-plan with both,
        then time the next epoch's updates afresh."""
        self.last = None
        self.eval_s = seconds
        if done < self.opt.max_updates:  # the plan's end is final: no warm restart of the schedule past it
            self.replan(done)
        self.spent, self.timed = 0.0, 0
        self.next_replan = CLOCK_STEPS * CLOCK_GROWTH

    def replan(self, done: int) -> None:
        """Re-fit the update count to the budget left at the recent update time (never below `done`)."""
        if self.timed == 0 or done >= self.opt.max_updates:
            return
        step_s = self.spent / self.timed
        costs = self.costs(step_s)
        if self.eval_s is not None:
            costs = StepCosts(step_s, self.eval_s, costs.final_s)
        fits = affordable_steps(
            self.remaining_s(), costs, self.schedule.steps_per_epoch, self.wanted, done_steps=done
        )
        total = self.agree(max(done, fits))
        if total != self.opt.max_updates:
            changed = abs(total - self.opt.max_updates) >= REPLAN_NOTE_SHARE * self.opt.max_updates
            logger.log(
                logging.INFO if changed else logging.DEBUG,
                "Measured %.3f s an update: planning %d updates instead of %d.",
                step_s, total, self.opt.max_updates,
            )  # fmt: skip
            self.opt.max_updates = total
            self.opt.scheduler = self.schedule.refit(self.opt.scheduler, total, done)
