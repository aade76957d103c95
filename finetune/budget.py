"""How many fine-tuning updates fit the time budget: the budget is spent in steps, not refused by epochs.

Deciding in whole epochs made a large dataset keep the linear probe (issue 19: 60,000 Fashion-MNIST images,
an estimated 566 s an epoch against a 900 s budget, 87.3%): a fraction of an epoch of fine-tuning already
beats the probe. So the plan counts updates: full epochs while they fit, then the updates of a last partial
epoch, each epoch followed by its validation pass, with the closing evaluation kept aside. The cosine
schedule then decays over exactly those updates (`finetune.trainer` rebuilds it once the real step time is
measured, so a wrong first estimate costs a few seconds, not the budget).
"""

from __future__ import annotations

from dataclasses import dataclass

MIN_FINETUNE_STEPS = 20  # fewer updates than this cannot move a probe-initialised network: keep the probe
WARMUP_SHARE = 0.2  # warmup takes at most this share of the updates a run can afford


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
