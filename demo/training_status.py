"""What a training job looks like from outside the trainer: its states, options, limits and progress.

`demo.training_jobs.TrainingManager` runs the jobs; the Train and Teach tabs and the app read these
snapshots and settings without needing the manager's threads.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.modeling import DEFAULT_MODEL

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED_STATES = (DONE, FAILED, CANCELLED)
MAX_TIME_BUDGET_S = 6 * 3600  # one visitor cannot hold the only training slot for longer
PUBLIC_BUDGET_S = 15 * 60  # the time-budget cap of a public server
PUBLIC_MAX_QUEUED = 4  # trainings waiting behind the running one on a public server


@dataclass(frozen=True)
class TrainLimits:
    """What one visitor may ask of the shared trainer. The defaults are a personal studio's (any timm
    model, any number of jobs); `public()` is what a server open to strangers applies."""

    models: tuple[str, ...] | None = None  # timm names offered; None: the default and any other timm name
    jobs_per_owner: int | None = None  # queued or running jobs one visitor may have; None: no limit
    max_budget_s: float = MAX_TIME_BUDGET_S  # the longest time budget a job may ask for
    threads: int = 0  # torch threads and decoding workers while training; 0: every core

    @classmethod
    def public(
        cls, models: tuple[str, ...] = (), max_budget_s: float = PUBLIC_BUDGET_S, threads: int = 0
    ) -> TrainLimits:
        """The embedded model plus `models`, one job per visitor, the budget cap, all cores but one."""
        allowed = tuple(dict.fromkeys((DEFAULT_MODEL, *models)))
        return cls(allowed, 1, max_budget_s, threads or max(1, (os.cpu_count() or 1) - 1))


@dataclass(frozen=True)
class TrainOptions:
    """The few options the Train tab offers; everything else keeps `TrainConfig`'s defaults."""

    model: str = DEFAULT_MODEL  # timm name; the default ships its ImageNet weights and works offline
    strategy: str = "auto"  # auto | linear | finetune | lp-ft
    epochs: int = 0  # fine-tuning epochs; 0 lets the engine choose from the data and the time budget
    time_budget_s: float = 300.0  # the engine plans within it, and the job stops when it is spent


@dataclass(frozen=True)
class JobStatus:
    """A snapshot of one job: what the progress bar, the epoch table and the API's answer are made of."""

    run_id: str
    state: str  # queued | running | done | failed | cancelled
    version: int  # grows with every change; `wait()` returns when it passes the caller's
    queue_position: int  # trainings ahead of this one, the running one included; 0 when next or running
    classes: list[str]
    phase: str = ""  # "", decode, probe, finetune
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    progress: float = 0.0  # 0..1 over the whole job (decoding, probe, fine-tuning epochs)
    message: str = ""
    step_metrics: dict[str, float] = field(default_factory=dict)  # running train loss / acc of this epoch
    history: list[dict[str, Any]] = field(default_factory=list)  # one row per finished epoch (0 = probe)
    metrics: dict[str, Any] = field(default_factory=dict)  # final metrics of the best checkpoint
    error: str = ""
    run_dir: Path | None = None
    elapsed_s: float = 0.0

    @property
    def is_finished(self) -> bool:
        return self.state in FINISHED_STATES

    @property
    def has_model(self) -> bool:
        """True when the job ended with a servable checkpoint (done, or cancelled after one was saved)."""
        return self.state in (DONE, CANCELLED) and bool(self.metrics)


def progress_share(status: JobStatus, strategy: str) -> float:
    """A rough share of the job done: decoding 10%, probe 15% (all the rest for `linear`), then epochs."""
    fraction = status.step / status.steps if status.steps else 0.0
    probe_share = 0.9 if strategy == "linear" else 0.15
    if status.phase == "decode":
        return 0.1 * fraction
    if status.phase == "probe":
        done = any(row.get("phase") == "probe" for row in status.history)
        return 0.1 + probe_share * (1.0 if done else fraction)
    if status.phase == "finetune" and status.epochs:
        epochs_done = max(0, status.epoch - 1) + fraction
        return 0.25 + 0.75 * min(1.0, epochs_done / status.epochs)
    return 0.0
