"""The training loops: linear probe on cached features, one fine-tuning epoch, and evaluation.

Everything here works on the decoded uint8 cache (`finetune.pixel_cache.CachedImages`) and is written once
for one process and for many (`DistContext`): batches are sharded by rank and metrics summed across ranks,
so the validation accuracy of a distributed run is that of the whole validation set.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)

from finetune.augment import augment, normalize
from finetune.data import batches
from finetune.distributed import DistContext
from finetune.pixel_cache import CachedImages

logger = logging.getLogger(__name__)

FP32_TRAINING_MAX_PX = 96  # CPUs without AMX train at or below this size in fp32 (`training_precision`)


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


@dataclass
class Precision:
    """Autocast settings for the device: bf16 on CPUs with AVX-512 BF16 and recent GPUs, else fp16/fp32."""

    device: torch.device
    dtype: torch.dtype | None  # None means fp32 (no autocast)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Map --precision to an autocast dtype that this device really supports."""
    if requested == "fp32":
        return Precision(device, None)
    if device.type == "cuda":
        return Precision(device, cuda_autocast_dtype(requested, torch.cuda.get_device_capability(device)))
    if requested == "fp16":
        return Precision(device, None)  # CPU fp16 autocast is slower than fp32; treat as fp32
    bf16_ok = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return Precision(device, torch.bfloat16 if bf16_ok else None)


def training_precision(precision: Precision, requested: str, image_size: int) -> Precision:
    """The precision of training steps: `precision`, except fp32 for small images on a CPU without AMX.

    bf16 autocast halves a CPU's forward pass, but not its backward pass. On the 2-core AMD EPYC (AVX-512
    BF16, no AMX) of our CI, tf_efficientnet_lite0 trained (forward + backward + AdamW, batch 32) faster in
    fp32 on small images and no faster on large ones (`python bench/train_precision.py`, fp32 vs bf16 img/s):
    whole backbone 32 px 419 vs 217, 64 px 221 vs 144, 96 px 120 vs 99, 128 px 65 vs 67, 224 px 18 vs 23;
    first half frozen 64 px 296 vs 191, 128 px 128 vs 108, 224 px 36 vs 37. Large fp32 activations also cost
    memory (a 224 px run: 3.85 against 2.53 GB peak RSS), so fp32 is kept to FP32_TRAINING_MAX_PX. Inference
    is faster in bf16 (64 px: 0.54 against 0.83 ms an image; 224 px: 8.5 against 19.5), so evaluation keeps
    `precision`. CPUs with AMX tiles (Intel Sapphire Rapids and later) run bf16 on them and keep it. A rule,
    not a timing race, so that a run and its resume (and two runs of one command) train in the same precision.
    """
    if requested != "auto" or precision.device.type != "cpu" or precision.dtype is None:
        return precision
    if image_size > FP32_TRAINING_MAX_PX or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return precision
    return Precision(precision.device, None)


def cuda_autocast_dtype(requested: str, capability: tuple[int, int]) -> torch.dtype:
    """bf16 only on GPUs that have it natively (compute capability 8.0+: A100, RTX 30xx, H100), else fp16.

    `torch.cuda.is_bf16_supported()` also says yes on T4 and V100 (7.x), which only emulate bf16, slowly;
    fp16 runs on their tensor cores and, with a GradScaler, trains as well. An explicit `bf16` is obeyed.
    """
    if requested == "fp16":
        return torch.float16
    if requested == "bf16":
        if capability < (8, 0):
            logger.warning(
                "This GPU (compute capability %d.%d) only emulates bf16; fp16 is faster.", *capability
            )
        return torch.bfloat16
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16


def to_device(pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """channels_last on the target device: the layout oneDNN and cuDNN convolutions are fastest with."""
    return pixels.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last)


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
        pixels = to_device(data.pixels[index], precision.device)
        with precision.autocast():
            pooled = model.forward_head(model.forward_features(normalize(pixels, mean, std)), pre_logits=True)
        features.append(pooled.float().cpu())
        if on_step is not None:
            on_step(step, steps)
    return dist.all_gather_rows(torch.cat(features), len(data))


def fit_softmax_regression(
    features: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    l2: float,
    steps: int,
    sample_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS: (weight (D, C), bias (C,)); the bias is not
    penalised. The loss is the (sample-weighted) mean cross-entropy + `l2` x the squared weights.

    The probe's minibatch AdamW (fit_linear_probe) needs ~1,500 small steps per fit; k-fold fits (the data
    checks, the few-shot refit) would multiply that, while L-BFGS on the whole set converges in a few dozen
    to a few hundred full-batch steps.
    """
    weight = torch.zeros(features.shape[1], num_classes, requires_grad=True)
    bias = torch.zeros(num_classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, history_size=10,
                                  line_search_fn="strong_wolfe")  # fmt: skip
    share = None if sample_weights is None else sample_weights / sample_weights.sum()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        losses = F.cross_entropy(features @ weight + bias, targets, reduction="none")
        loss = losses.mean() if share is None else (losses * share).sum()
        loss = loss + l2 * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    return weight.detach(), bias.detach()


def fit_linear_probe(
    train_features: torch.Tensor,
    train_targets: torch.Tensor,
    num_classes: int,
    epochs: int,
    class_weights: torch.Tensor | None = None,
    seed: int = 0,
    label_smoothing: float = 0.0,
    sample_weights: torch.Tensor | None = None,
) -> torch.nn.Linear:
    """A linear classifier on frozen features: AdamW + cosine decay, seconds even for thousands of images.

    It takes the fine-tuning loss (same class weights, same label smoothing) and, with `sample_weights`, draws
    each epoch's images in proportion to them as the fine-tuning sampler does, so the probe and the
    fine-tuned model are trained for, and compared on, the same thing.
    """
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(train_features.shape[1], num_classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    batch_size = 256
    count = len(train_targets)
    steps = epochs * -(-count // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    for _ in range(epochs):
        if sample_weights is not None:
            order = torch.multinomial(sample_weights, count, replacement=True, generator=generator)
        else:
            order = torch.randperm(count, generator=generator)
        for index in torch.split(order, batch_size):
            loss = F.cross_entropy(
                head(train_features[index]), train_targets[index], weight=class_weights,
                label_smoothing=label_smoothing,
            )  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head


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
        pixels, targets = data.pixels[index], data.targets[index]  # one batch read from the cache
        inputs = augment(pixels, s.mean, s.std, generator, hflip=s.hflip).to(precision.device)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
        targets = targets.to(precision.device)
        with precision.autocast():
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
) -> EvalResult:
    """Loss, top-1 and top-5 over the whole of `data`, summed across ranks (each evaluates its shard once)."""
    model.eval()
    count = len(data)
    per_rank = -(-count // dist.world_size)
    mine = torch.arange(dist.rank * per_rank, min(count, (dist.rank + 1) * per_rank))
    logits_parts = []
    for index in torch.split(mine, batch_size):
        pixels = to_device(data.pixels[index], precision.device)
        with precision.autocast():
            logits_parts.append(model(normalize(pixels, mean, std)).float().cpu())
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
