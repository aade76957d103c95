"""Multi-label training: the parts of `fine_tune` that differ for a labels CSV, in one object.

The trainer (finetune/trainer.py) keeps one engine for both kinds of run and calls `MultiLabelTask` where
single-label training uses softmax cross-entropy: the targets (multi-hot rows), the loss (timm's
BinaryCrossEntropy or asymmetric loss, with positive weights for rare labels), the probe, the validation
scores that choose the kept weights (mAP, threshold-free) and, at the end, the thresholds fitted on validation
and the reports. The metrics themselves live in finetune/multilabel.py.

Four decisions differ for multi-label data, measured with `bench/multilabel.py` (2x2 mosaics of 28 px
Fashion-MNIST items, 56 px images, tf_efficientnet_lite0, 2 shared CPU cores):

- The whole image (`whole_image`): no center crop, since a labelled thing may sit at the edge. The crop had
  trimmed the outer edge of every mosaic cell; without it test mAP rose from 0.9385 to 0.9502 (`shirt` AP
  0.73 -> 0.84, the sleeves that tell it from a T-shirt are no longer cut).

- Resolution: a multi-label image shows several things, each smaller than the image, so the single-label
  rule (small images at about twice their size) leaves each thing small: the 56 px mosaics trained at 128 px,
  each item at 64 px. At the backbone's native size the frozen features alone gained 3-4.5 mAP points (probe
  0.781 -> 0.814 validation mAP on 1,000 mosaics; 0.797 -> 0.842 test mAP on 3,000), so `plan_resolution`
  trains small multi-label images at native size (explicit --img-size wins).
- Updates: each label learns only from the images that show it and from its own binary loss, so the
  single-label count (about 180 updates, at least 4 epochs then) stopped early: validation mAP still rose
  1-2 points an epoch at the end of 4 (0.80 -> 0.83 -> 0.88 -> 0.90 -> 0.91). `wanted_steps` asks for about
  TARGET_STEPS instead; the time budget still cuts a run that cannot afford them (finetune/budget.py).
- Cached frozen layers instead of pixel jitter: with the first layers frozen, a run without pixel jitter
  computes their activations once (finetune/trunk_cache.py), and its epochs ran 2x faster (41-58 against
  20-23 img/s at 224 px on 2 cores). Multi-label runs spend that on more epochs, and keep the jitter's shift
  by moving the cached activations (recipe.py `plan_jitter`, `shifts_cached_activations`). Test mAP, seed 0
  / seed 1 of the benchmark: pixel jitter, 450 updates wanted (398 / 450 made in 879 / 893 s) 0.9502 /
  0.9474; as they are, 450 updates 0.9471 (seed 0, 486 s); as they are, 600 updates 0.9519 / 0.9463 (627 /
  571 s); shifted, 600 updates 0.9542 / 0.9468 (489 / 492 s). So TARGET_STEPS is 600 (8 epochs of the
  benchmark's 2,400 training mosaics).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)

from finetune.distributed import DistContext
from finetune.errors import DatasetError
from finetune.multilabel import (
    DEFAULT_THRESHOLD,
    fit_thresholds,
    multilabel_report,
    summary,
    write_reports,
)
from finetune.pixel_cache import CachedImages
from finetune.recipe import RecipePlan
from finetune.trunk_cache import TrunkActivations

logger = logging.getLogger(__name__)

MAX_POS_WEIGHT = 10.0
TARGET_STEPS, MAX_EPOCHS = 600, 20  # `auto`'s fine-tuning updates for multi-label data (single-label: 180)


def plan_resolution(plan: RecipePlan, native_size: int, img_size: int = 0) -> RecipePlan:
    """`plan` at the backbone's native size when the single-label rule chose less and no size was given:
    the things a multi-label image shows are smaller than the image (see the module docstring)."""
    size_reason, frozen = plan.reason.split("; ")[:2]  # the few-shot "probe only" rule is single-label
    if img_size or plan.image_size >= native_size:
        return (
            RecipePlan(plan.image_size, plan.frozen_groups, f"{size_reason}; {frozen}")
            if plan.probe_only
            else plan
        )
    reason = f"{native_size} px: native size for multi-label images (each object is smaller); {frozen}"
    return RecipePlan(native_size, plan.frozen_groups, reason)


def whole_image(data_config: dict[str, Any]) -> dict[str, Any]:
    """`data_config` resizing the whole image to the input size, with no center crop (crop_pct 1.0).

    timm's eval transform crops the center (crop_pct 0.875 for lite0), which suits one centred object but
    cuts what a multi-label image shows at its edges: the labels still say it is there. The run stores this
    config, so training, evaluation, prediction, ONNX and the app all see the whole image.
    """
    return {**data_config, "crop_pct": 1.0}


def wanted_steps(single_label_steps: int, steps_per_epoch: int) -> int:
    """The updates `auto` wants for multi-label data without --epochs: about TARGET_STEPS in whole epochs
    (at most MAX_EPOCHS), and never fewer than a single-label run of the same size."""
    epochs = min(MAX_EPOCHS, math.ceil(TARGET_STEPS / max(1, steps_per_epoch)))
    return max(single_label_steps, epochs * steps_per_epoch)


@dataclass
class MultiLabelEval:
    """Validation scores of a multi-label model (F1 at 0.5 while training; fitted thresholds at the end)."""

    loss: float
    mean_ap: float
    micro_f1: float
    macro_f1: float
    count: int
    probs: np.ndarray
    targets: np.ndarray

    def row(self) -> dict[str, float]:
        """The history-row fields (metrics.json, curves.png, the CLI's epoch line)."""
        return {
            "val_loss": self.loss, "val_map": self.mean_ap, "val_micro_f1": self.micro_f1,
            "val_macro_f1": self.macro_f1,
        }  # fmt: skip


def scores_of(
    logits: torch.Tensor, targets: torch.Tensor, thresholds: np.ndarray | None = None
) -> MultiLabelEval:
    """Loss (plain BCE summed over labels, the same for every phase), mAP and F1 of logits against targets."""
    if len(targets) == 0:
        empty = np.zeros((0, logits.shape[1]))
        return MultiLabelEval(0.0, 0.0, 0.0, 0.0, 0, empty, empty)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="sum").item() / len(targets)
    probs, array = torch.sigmoid(logits).numpy(), targets.numpy()
    cut = np.full(probs.shape[1], DEFAULT_THRESHOLD) if thresholds is None else thresholds
    report = multilabel_report(array, probs, cut, [str(i) for i in range(probs.shape[1])])
    scores = summary(report)
    return MultiLabelEval(
        loss, scores["mAP"], scores["micro_f1"], scores["macro_f1"], len(targets), probs, array
    )


@torch.inference_mode()
def evaluate(
    model: torch.nn.Module,
    data: CachedImages,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    precision: Any,
    dist: DistContext,
    batch_size: int = 64,
    trunk: TrunkActivations | None = None,
) -> MultiLabelEval:
    """Scores over the whole of `data`: each process scores its share, then the logits are gathered (AP
    ranks all images together, so it cannot be summed per process like accuracy)."""
    from finetune.engine import batch_inputs

    model.eval()
    parts = []
    for index in torch.split(dist.share(len(data)), batch_size):
        with (
            batch_inputs(model, data, index, mean, std, precision.device, trunk) as inputs,
            precision.autocast(),
        ):
            parts.append(model(inputs).float().cpu())
    logits = torch.cat(parts) if parts else torch.zeros(0, data.targets.shape[1])
    return scores_of(dist.all_gather_rows(logits, len(data)), data.targets)


def fit_probe(
    features: torch.Tensor, targets: torch.Tensor, epochs: int, loss_fn: torch.nn.Module, seed: int = 0
) -> torch.nn.Linear:
    """A linear multi-label head on frozen features, trained on the fine-tuning loss (AdamW + cosine)."""
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(features.shape[1], targets.shape[1])
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    optimizer = torch.optim.AdamW(head.parameters(), lr=3e-3, weight_decay=1e-4)
    batch_size, count = 256, len(targets)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs * -(-count // 256)))
    for _ in range(epochs):
        for index in torch.split(torch.randperm(count, generator=generator), batch_size):
            loss = loss_fn(head(features[index]), targets[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return head


def positive_weights(counts: np.ndarray, total: int) -> torch.Tensor:
    """Class-balanced positive weights: sqrt(negatives / positives) per label, between 1 and MAX_POS_WEIGHT.

    The square root (rather than the full ratio) lifts rare labels' gradients without making the model call
    them everywhere; the fitted thresholds then set each label's operating point.
    """
    positives = np.maximum(counts, 1).astype(np.float64)
    ratio = np.sqrt(np.maximum(total - counts, 1) / positives)
    return torch.tensor(np.clip(ratio, 1.0, MAX_POS_WEIGHT), dtype=torch.float32)


def make_loss(kind: str, pos_weight: torch.Tensor | None) -> torch.nn.Module:
    """timm's BinaryCrossEntropy (summed over labels, like cross-entropy's scale) or asymmetric loss."""
    from timm.loss import AsymmetricLossMultiLabel, BinaryCrossEntropy

    if kind == "asl":
        return AsymmetricLossMultiLabel(gamma_neg=4, gamma_pos=0, clip=0.05, pos_weight=pos_weight)
    return BinaryCrossEntropy(smoothing=0.0, pos_weight=pos_weight, sum_classes=True)


class MultiLabelTask:
    """What multi-label training does differently: targets, loss, probe, validation, thresholds, reports."""

    def __init__(self, labels: Sequence[str], loss: str = "bce") -> None:
        self.labels = list(labels)
        self.loss = loss
        self.pos_weight: torch.Tensor | None = None

    def attach_targets(
        self, caches: dict[str, CachedImages], label_sets: dict[Path, tuple[int, ...]], data_dir: Path
    ) -> list[str]:
        """Give each cache (N, L) multi-hot targets; refuse a label with no usable training image; warn."""
        for cache in caches.values():
            from finetune.labels_csv import multi_hot

            cache.targets = multi_hot([label_sets[path] for path in cache.paths], len(self.labels))
        train = caches["train"].targets.sum(dim=0)
        missing = [name for name, n in zip(self.labels, train.tolist(), strict=True) if n == 0]
        if missing:
            raise DatasetError(
                f"label(s) {', '.join(repr(n) for n in missing[:10])} in '{data_dir}' have no usable "
                "training image (their files could not be read); add readable images."
            )
        val = caches["val"].targets.sum(dim=0)
        absent = [name for name, n in zip(self.labels, val.tolist(), strict=True) if n == 0]
        if absent:
            return [
                f"label(s) {', '.join(repr(n) for n in absent[:10])} have no validation image: their AP and "
                "threshold cannot be measured (threshold 0.5) and macro averages leave them out; add images."
            ]
        return []

    def set_balance(self, mode: str, counts: np.ndarray, total: int) -> str:
        """Positive weights for rare labels under 'auto' (when some label is 3x rarer than not) and 'loss'."""
        weights = positive_weights(counts, total)
        if mode == "sampler":
            logger.warning("--balance sampler draws by class, which multi-label data lacks; using loss")
            mode = "loss"
        if mode == "auto":
            mode = "loss" if float(weights.max()) ** 2 >= 3 else "none"
        self.pos_weight = weights if mode == "loss" else None
        return mode

    def loss_fn(self, device: torch.device) -> torch.nn.Module:
        weight = None if self.pos_weight is None else self.pos_weight.to(device)
        return make_loss(self.loss, weight).to(device)

    def studio(self, thresholds: np.ndarray | None = None) -> dict[str, Any]:
        """What config.json stores (`studio.multilabel`): thresholds by label, loss, positive weights."""
        cut = np.full(len(self.labels), DEFAULT_THRESHOLD) if thresholds is None else thresholds
        weights = None if self.pos_weight is None else [round(float(w), 4) for w in self.pos_weight]
        return {
            "thresholds": {label: round(float(t), 6) for label, t in zip(self.labels, cut, strict=True)},
            "loss": self.loss,
            "pos_weight": weights,
            "activation": "sigmoid",
            "thresholds_fitted_on": None if thresholds is None else "validation, maximising each label's F1",
        }

    def finish(self, out_dir: Path, result: MultiLabelEval, prefix: str = "") -> dict[str, Any]:
        """Fit thresholds on validation, write the reports; returns the metrics for config.json."""
        thresholds = fit_thresholds(result.targets, result.probs)
        report = write_reports(out_dir, result.targets, result.probs, thresholds, self.labels, prefix)
        scores = summary(report)
        return {
            "thresholds": thresholds,
            "metrics": {
                "val_map": scores["mAP"], "val_micro_f1": scores["micro_f1"],
                "val_macro_f1": scores["macro_f1"], "val_loss": result.loss,
                "selected_on": "validation mAP, then validation loss",
            },
        }  # fmt: skip
