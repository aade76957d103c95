"""One training run's state, passed between `fine_tune`'s phases, and the bookkeeping every phase shares.

`finetune/run_prepare.py` builds it, `finetune/trainer.py` runs the phases (probe, fine-tune) and
`finetune/run_finish.py` closes the run; they record epochs, keep the best weights and save resumable states
the same way, through this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune import checkpoint, multilabel_train, reports
from finetune.config import TrainConfig
from finetune.distributed import DistContext
from finetune.engine import EvalResult, EventCallback, StopCheck, TrainEvent
from finetune.errors import ConfigError
from finetune.pixel_cache import CachedImages
from finetune.precision import Precision
from finetune.recipe import RecipePlan
from finetune.trunk_cache import TrunkCache


@dataclass
class TrainResult:
    """What a finished (or stopped) run produced."""

    run_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    strategy_used: str
    interrupted: bool = False
    bad_files: list[tuple[Path, str]] = field(default_factory=list)


@dataclass
class TrainingRun:
    """Everything one training run holds, passed between `fine_tune`'s phases."""

    config: TrainConfig
    dist: DistContext
    emit: EventCallback
    should_stop: StopCheck
    precision: Precision  # the probe's features and every evaluation
    train_precision: Precision  # the fine-tuning updates (precision.training_precision)
    model: torch.nn.Module
    labels: list[str]
    data_config: dict[str, Any]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: CachedImages
    val: CachedImages
    studio: dict[str, Any]
    test: CachedImages | None = None  # a test/ folder: evaluated once at the end, never used to choose
    plan: RecipePlan | None = None  # resolution and frozen groups `auto` chose (finetune/recipe.py)
    class_weights: torch.Tensor | None = None
    multilabel: multilabel_train.MultiLabelTask | None = None  # a labels CSV: sigmoid outputs
    sample_weights: torch.Tensor | None = None
    trunk: TrunkCache | None = (
        None  # the frozen layers' activations, when fine-tuning sees images as they are
    )
    history: list[dict[str, Any]] = field(default_factory=list)
    best: dict[str, Any] = field(default_factory=dict)  # metrics row of the best checkpoint so far
    started: float = field(default_factory=time.perf_counter)

    @property
    def run_dir(self) -> Path:
        return self.config.out


def keeps_probe(run: TrainingRun) -> bool:
    """`auto` on few-shot data (finetune/recipe.py): the probe only, refitted on train + val at the end.

    Only when `auto` chooses the epochs: --epochs N or another strategy asks for fine-tuning."""
    config = run.config
    return (
        config.strategy == "auto" and not config.epochs and run.plan is not None and run.plan.probe_only
        and run.multilabel is None and uses_probe(run)
    )  # fmt: skip


def uses_probe(run: TrainingRun) -> bool:
    is_linear_head = isinstance(run.model.get_classifier(), torch.nn.Linear)
    if run.config.strategy == "linear" and not is_linear_head:
        raise ConfigError(
            f"--strategy linear needs a linear classifier; {run.config.model} has another head."
        )
    return run.config.strategy in ("auto", "linear", "lp-ft") and is_linear_head


def is_better(row: dict[str, Any], best: dict[str, Any]) -> bool:
    """Higher top-1 wins; on a tie, the lower validation loss.

    The probe and fine-tuning are trained on the same loss (class weights, label smoothing, sampler) and
    scored with the same plain cross-entropy, so a tie is not decided by which phase smoothed its labels.
    """
    if not best:
        return True
    key = "val_map" if "val_map" in row else "val_top1"  # multi-label runs rank by mAP
    if row[key] != best[key]:
        return row[key] > best[key]
    return row["val_loss"] < best["val_loss"]


def history_row(
    run: TrainingRun,
    phase: str,
    epoch: int,
    result: EvalResult | multilabel_train.MultiLabelEval,
    train: dict[str, float],
) -> dict[str, Any]:
    if isinstance(result, multilabel_train.MultiLabelEval):
        scores = result.row()
    else:
        scores = {"val_loss": result.loss, "val_top1": result.top1, "val_top5": result.top5}
    return {"epoch": epoch, "phase": phase, **train, **scores, "elapsed_s": time.perf_counter() - run.started}


def record(
    run: TrainingRun, row: dict[str, Any], improved: bool, epochs: int, model: torch.nn.Module | None = None
) -> None:
    """Log an epoch, keep the best weights, refresh metrics.json and curves.png."""
    run.history.append(row)
    if improved:
        run.best = dict(row)
    if run.dist.is_main:
        if improved:
            checkpoint.save_run(run.run_dir, model or run.model, run.labels, run.data_config, studio_of(run))
        reports.write_history(run.run_dir, run.history)
    if row["phase"] == "probe":
        save_state(run, "probe", 0, epochs)
    run.emit(TrainEvent("epoch", row["phase"], row["epoch"], epochs, metrics={**row, "improved": improved}))


def studio_of(run: TrainingRun) -> dict[str, Any]:
    best = run.best
    metrics = {
        "val_top1": best.get("val_top1"),
        "val_top5": best.get("val_top5"),
        "val_loss": best.get("val_loss"),
        "best_epoch": best.get("epoch"),
        "strategy_used": "linear" if best.get("phase") == "probe" else _fine_tune_name(run.config.strategy),
        "selected_on": "validation top-1, then validation loss",  # what chose the kept weights
        "epochs_run": max((row["epoch"] for row in run.history), default=0),
        "wall_s": time.perf_counter() - run.started,
    }
    if run.multilabel is not None:
        metrics.update({k: best.get(k) for k in ("val_map", "val_micro_f1", "val_macro_f1")})
        metrics["selected_on"] = "validation mAP, then validation loss"
    return {**run.studio, "metrics": metrics}


def _fine_tune_name(strategy: str) -> str:
    return "finetune" if strategy == "finetune" else "lp-ft"


def save_state(run: TrainingRun, phase: str, epoch: int, epochs: int, **extra: Any) -> None:
    if not run.dist.is_main:
        return
    state = {
        "config": run.config.to_dict(),
        "phase": phase,
        "epoch": epoch,
        "epochs": epochs,
        "model": run.model.state_dict(),
        "best": run.best,
        "history": run.history,
        "studio": run.studio,
        "num_updates": extra.pop("num_updates", 0),
        "stale": extra.pop("stale", 0),
        **extra,
    }
    checkpoint.save_train_state(run.run_dir, state)
