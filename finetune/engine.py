"""The training loops: features for the linear probe, one fine-tuning epoch, and evaluation.

Everything here works on the decoded uint8 cache (`finetune.pixel_cache.CachedImages`) and is written once
for one process and for many (`DistContext`): batches are sharded by rank and metrics summed across ranks,
so the validation accuracy of a distributed run is that of the whole validation set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)

from finetune.augment import augment, normalize
from finetune.data import batches
from finetune.distributed import DistContext
from finetune.pixel_cache import CachedImages
from finetune.precision import Precision
from finetune.trunk_cache import TrunkActivations

logger = logging.getLogger(__name__)


@dataclass
class TrainEvent:
    """Progress reported to the CLI's tqdm bars and the app's progress bar."""

    kind: str  # "status" | "cache" | "step" | "epoch" | "done"
    phase: str = ""
    epoch: int = 0
    epochs: int = 0
    step: int = 0
    steps: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)
    message: str = ""


EventCallback = Callable[[TrainEvent], None]
StopCheck = Callable[[], bool]


@dataclass
class EvalResult:
    """Validation metrics; `predictions` are filled when asked (confusion matrix, reports)."""

    loss: float
    top1: float
    top5: float
    count: int
    predictions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    logits: torch.Tensor | None = None  # this process's rows, with `predictions` (top losses need them)


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last on the target device: the layout oneDNN and cuDNN convolutions are fastest with."""
    return pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


@contextlib.contextmanager
def batch_inputs(
    model: torch.nn.Module,
    data: CachedImages,
    index: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    trunk: TrunkActivations | None = None,
) -> Iterator[torch.Tensor]:
    """What to call `model` with for the images at `index`: their normalized pixels, or, with `trunk` (the
    frozen layers' cached activations of `data`, finetune/trunk_cache.py), a placeholder while those
    activations are fed past the frozen layers."""
    if trunk is None:
        yield normalize(to_device(data.pixels[index], device), mean, std)
        return
    with trunk.inputs(model, index, device) as inputs:
        yield inputs


def rank_batches(data: CachedImages, batch_size: int, dist: DistContext, **kwargs: Any) -> list[torch.Tensor]:
    """Index batches of this rank's share of `data`; pixels are gathered one batch at a time, when used."""
    return list(batches(len(data), batch_size, rank=dist.rank, world_size=dist.world_size, **kwargs))


@torch.inference_mode()
def extract_features(
    model: torch.nn.Module,
    data: CachedImages,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    precision: Precision,
    batch_size: int = 64,
    on_step: Callable[[int, int], None] | None = None,
    dist: DistContext | None = None,
    trunk: TrunkActivations | None = None,
) -> torch.Tensor:
    """Pooled backbone features (pre-logits) of every cached image, for the linear probe.

    Distributed, each process extracts only its share and the shares are gathered, so every process ends
    with the features of the whole set at 1/world_size of the cost.
    """
    dist = dist or DistContext(device=precision.device)
    model.eval()
    features = []
    share = dist.share(len(data))
    steps = -(-len(share) // batch_size)
    for step, index in enumerate(torch.split(share, batch_size), start=1):
        with (
            batch_inputs(model, data, index, mean, std, precision.device, trunk) as inputs,
            precision.autocast(),
        ):
            pooled = model.forward_head(model.forward_features(inputs), pre_logits=True)
        features.append(pooled.float().cpu())
        if on_step is not None:
            on_step(step, steps)
    return dist.all_gather_rows(torch.cat(features), len(data))


def probe_metrics(head: torch.nn.Linear, features: torch.Tensor, targets: torch.Tensor) -> EvalResult:
    """Validation metrics of a probe head on precomputed features."""
    with torch.no_grad():
        logits = head(features)
    return logits_metrics(logits, targets)


def logits_metrics(logits: torch.Tensor, targets: torch.Tensor) -> EvalResult:
    """Loss, top-1/5, predictions and logits from logits already computed (one pass serves several uses)."""
    return replace(_metrics_from_logits(logits, targets, keep_predictions=True), logits=logits)


@dataclass(frozen=True)
class EpochSettings:
    """What stays the same across a run's fine-tuning epochs; `train_one_epoch` reads nothing else."""

    precision: Precision
    dist: DistContext
    mean: tuple[float, ...]
    std: tuple[float, ...]
    batch_size: int  # per process
    seed: int = 0
    clip_grad: float = 0.0  # max gradient norm; 0 disables clipping
    hflip: bool = False
    jitter: bool = True  # finetune/augment.py's affine + photometric jitter (recipe.plan_jitter)
    trunk: TrunkActivations | None = None  # the training images' frozen-layer activations (no pixel jitter)
    trunk_shift: bool = False  # shift those activations at random (trunk_cache.shift_maps; recipe.py)
    freeze_bn: bool = True
    sample_weights: torch.Tensor | None = None  # class-balanced sampling when set


@dataclass
class Optimization:
    """The objects one update step changes: optimizer and schedule, loss, optional EMA and grad scaler."""

    optimizer: torch.optim.Optimizer
    scheduler: Any
    loss_fn: torch.nn.Module
    ema: Any = None
    grad_scaler: Any = None
    max_updates: int = 0  # the run's last update (the time budget's plan); 0: no limit


def train_one_epoch(
    model: torch.nn.Module,
    data: CachedImages,
    settings: EpochSettings,
    opt: Optimization,
    epoch: int,
    num_updates: int = 0,
    on_step: Callable[[int, int, dict[str, float]], None] | None = None,
    should_stop: StopCheck | None = None,
) -> tuple[dict[str, float], int, bool]:
    """One pass over this rank's shard; returns (train metrics, updates done so far, was it stopped early)."""
    s, dist, precision = settings, settings.dist, settings.precision
    optimizer, grad_scaler = opt.optimizer, opt.grad_scaler
    model.train()
    _keep_norms_in_eval(model, every_norm=s.freeze_bn)
    # Seeded per epoch so a resumed run repeats its epochs; per rank too, or every process would draw the same
    # augmentations and dropout masks for its images (rank 0 keeps the stream of a one-process run).
    epoch_seed = s.seed * 7919 + epoch + dist.rank * 1_000_003
    generator = torch.Generator().manual_seed(epoch_seed)
    torch.manual_seed(epoch_seed)  # dropout / drop-path repeat on resume
    shard = rank_batches(
        data,
        s.batch_size,
        dist,
        shuffle=True,
        seed=s.seed,
        epoch=epoch,
        drop_last=True,
        sample_weights=s.sample_weights,
    )
    total_loss = total_correct = total_seen = 0.0
    started = time.perf_counter()
    stopped = False
    for step, index in enumerate(shard, start=1):
        if opt.max_updates and num_updates >= opt.max_updates:
            break  # the budget's last update: a partial epoch, not a stop request
        if should_stop is not None and dist.any_true(should_stop()):
            stopped = True
            break
        targets = data.targets[index].to(precision.device)
        with _training_inputs(model, data, index, s, generator) as inputs, precision.autocast():
            logits = model(inputs)
            loss = opt.loss_fn(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        if grad_scaler is not None:
            grad_scaler.scale(loss).backward()
            grad_scaler.unscale_(optimizer)
        else:
            loss.backward()
        if s.clip_grad > 0:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.clip_grad)
        if grad_scaler is not None:
            grad_scaler.step(optimizer)
            grad_scaler.update()
        else:
            optimizer.step()
        num_updates += 1
        opt.scheduler.step_update(num_updates=num_updates)
        if opt.ema is not None:
            opt.ema.update(model, step=num_updates)
        total_loss += loss.item() * len(targets)
        if targets.ndim == 2:  # multi-label (finetune/multilabel.py): the share of labels called right
            total_correct += ((logits > 0) == (targets > 0.5)).float().mean(dim=1).sum().item()
        else:
            total_correct += (logits.argmax(dim=1) == targets).sum().item()
        total_seen += len(targets)
        if on_step is not None:
            steps = min(len(shard), step + opt.max_updates - num_updates) if opt.max_updates else len(shard)
            on_step(step, steps, {"loss": total_loss / total_seen, "acc": total_correct / total_seen})
    loss_sum, correct, seen = dist.all_reduce_sum([total_loss, total_correct, total_seen])
    elapsed = time.perf_counter() - started
    metrics = {
        "train_loss": loss_sum / max(seen, 1),
        "train_acc": correct / max(seen, 1),
        "train_images_per_s": seen / max(elapsed, 1e-9),
        "lr": max(group["lr"] for group in optimizer.param_groups),
    }
    return metrics, num_updates, stopped


@contextlib.contextmanager
def _training_inputs(
    model: torch.nn.Module,
    data: CachedImages,
    index: torch.Tensor,
    s: EpochSettings,
    generator: torch.Generator,
) -> Iterator[torch.Tensor]:
    """One training batch as the model takes it: augmented pixels, or the placeholder (cached activations)."""
    if s.trunk is not None:
        shifts = generator if s.trunk_shift else None
        with s.trunk.inputs(model, index, s.precision.device, shifts) as inputs:
            yield inputs
        return
    inputs = augment(data.pixels[index], s.mean, s.std, generator, hflip=s.hflip, jitter=s.jitter)
    yield inputs.to(s.precision.device).contiguous(memory_format=torch.channels_last)


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    data: CachedImages,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    precision: Precision,
    dist: DistContext,
    batch_size: int = 64,
    keep_predictions: bool = False,
    trunk: TrunkActivations | None = None,
) -> EvalResult:
    """Loss, top-1 and top-5 over the whole of `data`, summed across ranks (each evaluates its shard once)."""
    model.eval()
    count = len(data)
    per_rank = -(-count // dist.world_size)
    mine = torch.arange(dist.rank * per_rank, min(count, (dist.rank + 1) * per_rank))
    logits_parts = []
    for index in torch.split(mine, batch_size):
        with (
            batch_inputs(model, data, index, mean, std, precision.device, trunk) as inputs,
            precision.autocast(),
        ):
            logits_parts.append(model(inputs).float().cpu())
    num_classes = _num_classes(model)
    logits = torch.cat(logits_parts) if logits_parts else torch.zeros(0, num_classes)
    local = _metrics_from_logits(logits, data.targets[mine], keep_predictions=keep_predictions)
    loss_sum, top1_sum, top5_sum, seen = dist.all_reduce_sum(
        [local.loss * local.count, local.top1 * local.count, local.top5 * local.count, local.count]
    )
    seen = max(seen, 1)
    return EvalResult(
        loss=loss_sum / seen,
        top1=top1_sum / seen,
        top5=top5_sum / seen,
        count=int(seen),
        predictions=local.predictions,
        targets=local.targets,
        logits=logits if keep_predictions else None,
    )


def _metrics_from_logits(logits: torch.Tensor, targets: torch.Tensor, keep_predictions: bool) -> EvalResult:
    if len(targets) == 0:
        return EvalResult(loss=0.0, top1=0.0, top5=0.0, count=0)
    loss = F.cross_entropy(logits, targets).item()
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    top1 = (top[:, 0] == targets).sum().item() / len(targets)
    top5 = (top == targets[:, None]).any(dim=1).sum().item() / len(targets)
    return EvalResult(
        loss=loss,
        top1=top1,
        top5=top5,
        count=len(targets),
        predictions=top[:, 0] if keep_predictions else None,
        targets=targets if keep_predictions else None,
    )


def _num_classes(model: torch.nn.Module) -> int:
    return int(getattr(getattr(model, "module", model), "num_classes", 0))


def _keep_norms_in_eval(model: torch.nn.Module, every_norm: bool) -> None:
    """Keep BatchNorm statistics fixed: those of frozen layers always, all of them with `every_norm`.

    Batch statistics of 32 small-data images are noisy, and switching from the pretrained running statistics
    to them changes every feature at once, which wrecks the probe-fitted head in the first fine-tuning steps.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            params = list(module.parameters(recurse=False))
            if every_norm or (params and not any(p.requires_grad for p in params)):
                module.eval()
