"""TrainingManager: the app's training jobs, run one at a time by one background thread on `fine_tune`.

A request imports its dataset (`demo.uploads`), then `submit()` queues it and returns its run id at once; the
worker runs queued jobs first come, first served, each into `DATA_DIR/runs/<run_id>/`. The engine's
`TrainEvent` callbacks become progress snapshots (`JobStatus`) that the Train tab polls or waits on, and
Cancel is the engine's `should_stop` callback, so a cancelled run ends at a batch edge with its best
checkpoint saved. When a job leaves a model, `on_model_ready(run_id, run_dir)` lets the app serve it right
away. Disk use is bounded: a job's uploaded dataset is deleted when it ends, and `RunStore` strips and prunes
the run folders, never one in progress or one a visitor is using (`runs_in_use`). Each job has an owner
(`demo.lanes` owner key): only the owner cancels it. `TrainLimits` bound what one visitor may ask for; a
public server uses `TrainLimits.public()`. No Gradio here: tests drive it directly.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from demo.lanes import not_yours
from demo.run_store import RunStore, has_model
from demo.training_status import (
    CANCELLED,
    DONE,
    FAILED,
    MAX_TIME_BUDGET_S,
    QUEUED,
    RUNNING,
    JobStatus,
    TrainLimits,
    TrainOptions,
    progress_share,
)
from finetune.config import TrainConfig
from finetune.distributed import DistContext, resolve_device
from finetune.engine import TrainEvent
from finetune.errors import ConfigError, StoppedError, StudioError
from finetune.labels_csv import labels_source
from finetune.modeling import DEFAULT_MODEL, check_model_name
from finetune.trainer import fine_tune

logger = logging.getLogger(__name__)

TEST_MODELS = ("test_efficientnet", "test_vit")  # timm's tiny random-init models, for tests and demos only
KEEP_FINISHED_JOBS = 100  # status records of ended jobs kept in memory (their folders follow the run limits)

ModelReadyHook = Callable[[str, Path], None]
RunRemovedHook = Callable[[str], None]


@dataclass
class _Job:
    """A job's mutable state; the manager's condition guards every field."""

    status: JobStatus
    config: TrainConfig
    dataset_dir: Path
    owner: str | None = None  # owner key of the visitor who asked for it; None: the operator (tests, CLI)
    cancel: threading.Event = field(default_factory=threading.Event)
    started: float = 0.0
    timed_out: bool = False

    def update(self, **changes: Any) -> None:
        self.status = replace(self.status, version=self.status.version + 1, **changes)


class TrainingManager:
    """One worker thread, a FIFO queue with positions, progress snapshots, cancel, run folders and pruning."""

    def __init__(
        self,
        data_dir: Path,
        *,
        max_runs: int = 20,
        max_run_bytes: int = 5 * 1024**3,
        max_queued: int = 8,
        allow_test_models: bool = False,
        limits: TrainLimits | None = None,
        train_overrides: dict[str, Any] | None = None,
        on_model_ready: ModelReadyHook | None = None,
        on_run_removed: RunRemovedHook | None = None,
    ) -> None:
        """Args:
        limits: what one visitor may ask for (default: a personal studio's `TrainLimits()`).
        train_overrides: extra `TrainConfig` fields for every job (tests use a small `img_size`).
        on_model_ready: called with (run_id, run_dir) when a job leaves a model, before it reports done.
        on_run_removed: called with the run id of every run folder that pruning deletes.
        """
        if max_queued < 0:
            raise ConfigError(f"max_queued must be at least 0, got {max_queued}.")
        self.data_dir = Path(data_dir)
        self.runs = RunStore(self.data_dir / "runs", max_runs, max_run_bytes)
        self.runs_dir = self.runs.runs_dir
        self.datasets_dir = self.data_dir / "datasets"
        self.max_queued = max_queued
        self.allow_test_models = allow_test_models
        self.limits = limits or TrainLimits()
        self.runs_in_use: Callable[[], Collection[str]] | None = None  # models visitors use: never pruned
        self.train_overrides = dict(train_overrides or {})
        self.on_model_ready = on_model_ready
        self.on_run_removed = on_run_removed
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[str] = deque()
        self._condition = threading.Condition()
        self._closing = False
        shutil.rmtree(self.datasets_dir, ignore_errors=True)  # uploads of jobs a restart forgot
        self.runs.clean_leftovers()
        self.prune()
        self._worker = threading.Thread(target=self._work, name="training-worker", daemon=True)
        self._worker.start()

    def model_choices(self) -> list[str]:
        """Model names the Train tab offers: the allow-list (or the default), plus the test models when
        allowed."""
        tests = TEST_MODELS if self.allow_test_models else ()
        offered = [*(self.limits.models or (DEFAULT_MODEL,)), *tests]
        return list(dict.fromkeys(offered))

    def check_room(self, owner: str | None = None) -> None:
        """Refuse at once (before an upload is unpacked) when the queue is full or `owner` has a job."""
        with self._condition:
            self._check_room(owner)

    def submit(
        self, dataset_dir: Path, classes: list[str], options: TrainOptions, owner: str | None = None
    ) -> str:
        """Queue training on `dataset_dir` (which the manager now owns and deletes when the job ends) for
        the visitor `owner`.

        Bad options raise `ConfigError` and a full queue a `StudioError`, before anything is queued.
        """
        try:
            with self._condition:
                self._check_room(owner)
                run_id = self._new_run_id(classes)
                config = self._config(dataset_dir, self.runs_dir / run_id, options)
                status = JobStatus(
                    run_id, QUEUED, 0, 0, list(classes), run_dir=config.out, message="Waiting to start"
                )
                self._jobs[run_id] = _Job(
                    status=status, config=config, dataset_dir=Path(dataset_dir), owner=owner
                )
                self._queue.append(run_id)
                self._refresh_positions()
                self._condition.notify_all()
        except BaseException:
            shutil.rmtree(dataset_dir, ignore_errors=True)
            raise
        logger.info("Queued training %s (%s, %d classes).", run_id, options.model, len(classes))
        return run_id

    def status(self, run_id: str) -> JobStatus:
        """The latest snapshot of `run_id`."""
        with self._condition:
            return self._job(run_id).status

    def wait(self, run_id: str, after_version: int = -1, timeout_s: float | None = None) -> JobStatus:
        """The snapshot once its version passes `after_version` (or at `timeout_s`, or when it ends)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._condition:
            while True:
                status = self._job(run_id).status
                if status.version > after_version or status.is_finished:
                    return status
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return status
                self._condition.wait(remaining)

    def wait_until_finished(self, run_id: str, timeout_s: float | None = None) -> JobStatus:
        """Block until the job ends (or `timeout_s` passes); returns the last snapshot."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._condition:
            while not self._job(run_id).status.is_finished:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._condition.wait(remaining)
            return self._job(run_id).status

    def owner_of(self, run_id: str) -> str | None:
        """Who asked for `run_id`: its job's owner, or the one its run folder records (after a restart)."""
        with self._condition:
            job = self._jobs.get(run_id)
        return job.owner if job is not None else self.runs.owner(run_id)

    def check_owner(self, run_id: str, owner: str) -> None:
        """The one refusal, alike for a run that does not exist and another visitor's run."""
        if not run_id or self.owner_of(run_id) != owner:
            raise not_yours("training run", run_id or "")

    def cancel(self, run_id: str, owner: str | None = None) -> JobStatus:
        """Stop a job (only its `owner` may, when given): a queued one never starts; a running one ends at
        the next batch, keeping its best."""
        if owner is not None:
            self.check_owner(run_id, owner)
        with self._condition:
            job = self._job(run_id)
            if job.status.state == QUEUED:
                self._queue.remove(run_id)
                job.update(state=CANCELLED, queue_position=0, message="Cancelled before it started")
                self._refresh_positions()
                shutil.rmtree(job.dataset_dir, ignore_errors=True)
            elif job.status.state == RUNNING:
                job.cancel.set()
                job.update(message="Cancelling: stopping at the next batch and keeping the best checkpoint")
            self._condition.notify_all()
            return job.status

    def existing_runs(self) -> list[Path]:
        """Run folders with a model, oldest first, not counting runs in progress: the app serves them."""
        with self._condition:
            active = self._active_ids()
        return self.runs.finished_runs(active)

    def zip_run(self, run_id: str, out_dir: Path) -> Path:
        """`out_dir/<run_id>.zip` of a finished run folder, without its cache and resumable state."""
        with self._condition:
            active = self._active_ids()
        return self.runs.zip_run(run_id, out_dir, active)

    def prune(self) -> list[str]:
        """Delete the oldest runs past the store's limits (never one in progress or in use by a visitor);
        tell `on_run_removed`."""
        with self._condition:
            active = self._active_ids()
        in_use = set(self.runs_in_use()) if self.runs_in_use is not None else set()
        removed = self.runs.prune(active | in_use)
        if self.on_run_removed is not None:
            for run_id in removed:
                self.on_run_removed(run_id)
        return removed

    def close(self, timeout_s: float = 30.0) -> None:
        """Cancel everything and stop the worker (server shutdown, tests)."""
        with self._condition:
            self._closing = True
            for run_id in list(self._queue):
                self.cancel(run_id)
            running = self._running_id()
            if running:
                self._jobs[running].cancel.set()
            self._condition.notify_all()
        self._worker.join(timeout_s)

    # The worker thread.

    def _work(self) -> None:
        while True:
            with self._condition:
                while not self._queue and not self._closing:
                    self._condition.wait()
                if self._closing and not self._queue:
                    return
                run_id = self._queue.popleft()
                job = self._jobs[run_id]
                job.started = time.monotonic()
                job.update(state=RUNNING, queue_position=0, message="Starting")
                self._refresh_positions()
                self._condition.notify_all()
            self._run(job)
            self.prune()
            self._forget_old_jobs()

    def _run(self, job: _Job) -> None:
        run_id = job.status.run_id
        if self.limits.threads:
            torch.set_num_threads(self.limits.threads)  # leave a core to Classify while training
        budget_s = job.config.time_budget_s

        def should_stop() -> bool:
            if job.cancel.is_set():
                return True
            if time.monotonic() - job.started > budget_s:
                job.timed_out = True
                return True
            return False

        try:
            result = fine_tune(
                job.config,
                on_event=lambda event: self._on_event(job, event),
                should_stop=should_stop,
                dist=DistContext(device=resolve_device(job.config.device)),  # always one process here
            )
            state, error = (CANCELLED if job.cancel.is_set() else DONE), ""
            if not result.metrics:
                state, error = _nothing_saved(job)
            else:
                if job.owner is not None:
                    self.runs.set_owner(run_id, job.owner)
                if self.on_model_ready is not None:
                    self.on_model_ready(run_id, job.config.out)
        except StoppedError:  # cancel or the budget, while decoding or extracting features: nothing saved
            result = None
            state, error = _nothing_saved(job)
        except StudioError as failure:
            result, state, error = None, FAILED, str(failure)
        except Exception as failure:  # a bug: keep the traceback in the log, tell the user what happened
            logger.exception("Training %s failed", run_id)
            result, state, error = (
                None,
                FAILED,
                f"training failed unexpectedly ({type(failure).__name__}: {failure})",
            )
        shutil.rmtree(job.dataset_dir, ignore_errors=True)
        self.runs.finish(run_id, keep=state != FAILED and result is not None and bool(result.metrics))
        with self._condition:
            changes: dict[str, Any] = {"state": state, "error": error, "message": _final_message(state, job)}
            if result is not None and result.metrics:
                changes.update(metrics=dict(result.metrics), history=list(result.history), progress=1.0)
            job.update(elapsed_s=time.monotonic() - job.started, **changes)
            self._condition.notify_all()
        logger.info("Training %s ended: %s %s", run_id, state, error)

    def _on_event(self, job: _Job, event: TrainEvent) -> None:
        """Fold one engine event into the job's snapshot and wake whoever waits on it."""
        with self._condition:
            status = job.status
            changes: dict[str, Any] = {"elapsed_s": time.monotonic() - job.started}
            if event.kind == "status":
                changes["message"] = event.message
            elif event.kind == "cache":
                changes.update(phase="decode", step=event.step, steps=event.steps)
                changes["message"] = f"Decoding {event.phase} images ({event.step}/{event.steps})"
            elif event.kind == "step":
                changes.update(
                    phase=event.phase, step=event.step, steps=event.steps, step_metrics=event.metrics
                )
                if event.phase == "finetune":
                    changes.update(epoch=event.epoch, epochs=event.epochs)
            elif event.kind == "epoch":
                row = {key: value for key, value in event.metrics.items() if key != "improved"}
                changes.update(history=[*status.history, row], step=0, steps=0, step_metrics={})
                changes.update(epoch=event.epoch, epochs=max(event.epochs, status.epochs))
            elif event.kind == "done":
                changes["metrics"] = dict(event.metrics)
            job.update(**changes)
            job.update(progress=max(status.progress, progress_share(job.status, job.config.strategy)))
            self._condition.notify_all()

    # Housekeeping.

    def _check_room(self, owner: str | None) -> None:
        """Refuse when closing, when the queue is full, or when `owner` already has its jobs."""
        if self._closing:
            raise StudioError("the server is shutting down; try again in a minute.")
        active = self._active_ids()
        if len(active) > self.max_queued:
            raise StudioError(
                f"the training queue is full ({len(self._queue)} waiting); try again when one has finished."
            )
        limit = self.limits.jobs_per_owner
        mine = sum(self._jobs[rid].owner == owner for rid in active) if owner is not None else 0
        if limit is not None and mine >= limit:
            raise StudioError(
                f"you already have {limit} training{'s' if limit > 1 else ''} queued or running here; "
                "wait for it to end (or cancel it) before starting another."
            )

    def _config(self, dataset_dir: Path, out: Path, options: TrainOptions) -> TrainConfig:
        """The job's `TrainConfig`, validated now so a bad option is refused before it is queued."""
        model = (options.model or DEFAULT_MODEL).strip()
        if model in TEST_MODELS and not self.allow_test_models:
            raise ConfigError(f"'{model}' is a test model; choose {DEFAULT_MODEL} or another timm model.")
        if self.limits.models is not None and model not in self.model_choices():
            offered = ", ".join(self.model_choices())
            raise ConfigError(f"'{model[:80]}' is not offered on this server; choose one of: {offered}.")
        check_model_name(model)
        max_budget_s = min(MAX_TIME_BUDGET_S, self.limits.max_budget_s)
        budget_s = float(options.time_budget_s)
        if not 0 < budget_s <= max_budget_s:  # also refuses NaN
            raise ConfigError(
                f"invalid time budget {budget_s / 60:g} minutes; use up to {max_budget_s / 60:g} minutes."
            )
        values = {
            "data_dir": labels_source(dataset_dir),
            "out": out,
            "model": model,
            "weights": "none" if model in TEST_MODELS else "auto",
            "strategy": options.strategy,
            "epochs": int(options.epochs),
            "time_budget_s": float(options.time_budget_s),
            "quiet": True,
            **({"workers": self.limits.threads} if self.limits.threads else {}),
            **self.train_overrides,
        }
        return TrainConfig(**values)

    def _new_run_id(self, classes: list[str]) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", "-".join(classes).lower()).strip("-")[:32].strip("-") or "run"
        stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"
        run_id, n = stem, 1
        while run_id in self._jobs or (self.runs_dir / run_id).exists():
            n += 1
            run_id = f"{stem}-{n}"
        return run_id

    def _job(self, run_id: str) -> _Job:
        job = self._jobs.get(run_id)
        if job is None:
            raise ConfigError(f"unknown training run '{run_id}'; start a training first.")
        return job

    def _running_id(self) -> str | None:
        return next((rid for rid, job in self._jobs.items() if job.status.state == RUNNING), None)

    def _active_ids(self) -> set[str]:
        return {rid for rid, job in self._jobs.items() if not job.status.is_finished}

    def _refresh_positions(self) -> None:
        """Count, for each waiting job, the trainings ahead of it (a job about to be picked up has none)."""
        first = 1 if self._running_id() else 0
        for position, run_id in enumerate(self._queue, start=first):
            job = self._jobs[run_id]
            if job.status.queue_position != position:
                ahead = "1 training" if position == 1 else f"{position} trainings"
                message = f"Waiting: {ahead} ahead (the running one included)" if position else "Starting"
                job.update(queue_position=position, message=message)

    def _forget_old_jobs(self) -> None:
        with self._condition:
            ended = [rid for rid, job in self._jobs.items() if job.status.is_finished]
            for run_id in ended[: max(0, len(ended) - KEEP_FINISHED_JOBS)]:
                del self._jobs[run_id]


def _nothing_saved(job: _Job) -> tuple[str, str]:
    if job.cancel.is_set():
        return CANCELLED, ""
    if job.timed_out:
        return FAILED, (
            f"the time budget ({job.config.time_budget_s:.0f} s) ran out before the first checkpoint; "
            "raise the budget or upload fewer images."
        )
    return FAILED, "training ended without a checkpoint."


def _final_message(state: str, job: _Job) -> str:
    if state == CANCELLED:
        return "Cancelled" + ("; the best checkpoint so far is kept" if has_model(job.config.out) else "")
    if state == DONE and job.timed_out:
        return "Stopped at the time budget; the best checkpoint so far is kept"
    return {DONE: "Finished", FAILED: "Failed"}.get(state, state)
