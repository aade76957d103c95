"""After training: fit the temperature and the "none of these" rule on the run's own held-out images.

`fit_trust` is pure numbers (logits, features, targets in; the config.json sections out), so tests and
`bench/trust.py` call it the same way training does; `trust_sections` runs the kept model over the training
caches to get those numbers. The validation split fits both the temperature (NLL) and the OOD threshold
(the score that accepts `accept_rate` of it); the class means of the cosine score come from the training
features, so the threshold is measured on images the means never saw.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune import ood
from finetune.augment import normalize
from finetune.calibration import calibration_figures, fit_temperature, plot_reliability, softmax_t
from finetune.engine import to_device
from finetune.pixel_cache import CachedImages
from finetune.trust import LogitsAndFeatures

logger = logging.getLogger(__name__)

MAX_TRAIN_PER_CLASS = 200  # class means settle long before this; bounds the extra pass on large datasets
MAX_TRAIN_IMAGES = 5000  # and in total (at least 5 per class): many classes must not mean a long pass


def fit_trust(
    val_logits: np.ndarray,
    val_targets: np.ndarray,
    val_features: np.ndarray,
    train_features: np.ndarray,
    train_targets: np.ndarray,
    num_classes: int,
    accept_rate: float = ood.DEFAULT_ACCEPT_RATE,
    method: str = ood.DEFAULT_METHOD,
) -> dict[str, dict[str, Any]]:
    """`{"calibration": {...}, "ood": {...}}` for `studio` in config.json."""
    calibration = calibration_section(val_logits, val_targets)
    means = ood.class_means(train_features, train_targets, num_classes) if method == "cosine" else None
    probe = ood.Rejector(method, 0.0, accept_rate, means)
    val_scores = probe.score(val_logits, val_features)
    rule = ood.Rejector(method, ood.threshold_for(val_scores, accept_rate), accept_rate, means)
    stored = rule.to_dict()
    stored["val_accepted"] = float((val_scores <= rule.threshold).mean())
    return {"calibration": calibration, "ood": stored}


def calibration_section(
    logits: np.ndarray, targets: np.ndarray, fitted_on: str = "validation"
) -> dict[str, Any]:
    """`studio.calibration`: the temperature fitted (NLL) on held-out `logits`, its ECE before and after."""
    temperature = fit_temperature(logits, targets)
    calibration = {"temperature": temperature, "fitted_on": fitted_on, "n_images": int(len(targets))}
    calibration.update(calibration_figures(logits, targets, temperature))
    return calibration


def draw_reliability(logits: np.ndarray, targets: np.ndarray, temperature: float, png: Path) -> None:
    """The reliability diagram of held-out `logits`, raw and at `temperature`."""
    scaled = softmax_t(logits, temperature)
    plot_reliability([("raw softmax", softmax_t(logits)), (f"T = {temperature:.2f}", scaled)], targets, png)


@torch.inference_mode()
def collect_outputs(
    model: torch.nn.Module,
    data: CachedImages,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    index: torch.Tensor | None = None,
    batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """fp32 logits and penultimate features of cached images (all, or `index`), as inference computes them.

    Half the evaluation's batch: this pass runs at the end of training beside the trained model and the kept
    one, and must not be the run's memory peak."""
    net = LogitsAndFeatures(model).eval()
    rows = torch.arange(len(data)) if index is None else index
    logits, features = [], []
    for chunk in torch.split(rows, batch_size):
        pixels = to_device(data.pixels[chunk], device)  # channels_last, as evaluation (no reorder copies)
        chunk_logits, chunk_features = net(normalize(pixels, mean, std))
        logits.append(chunk_logits.float().cpu())
        features.append(chunk_features.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(features).numpy()


def trust_sections(
    model: torch.nn.Module,
    train: CachedImages,
    val: CachedImages,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    num_classes: int,
    accept_rate: float = ood.DEFAULT_ACCEPT_RATE,
    reliability_png: Path | None = None,
    val_outputs: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fit calibration and the OOD rule for the kept `model` from the run's train and validation caches;
    draw the validation reliability diagram into `reliability_png` when given.

    `val_outputs`: the validation (logits, features) from `collect_outputs` when the caller already ran
    that pass (training's closing evaluation does): on 12,000 images at 224 px a pass costs minutes."""
    targets = train.targets.numpy()
    generator = np.random.default_rng(0)
    per_class = min(MAX_TRAIN_PER_CLASS, max(5, MAX_TRAIN_IMAGES // num_classes))
    chosen = np.concatenate(
        [generator.permutation(np.flatnonzero(targets == c))[:per_class] for c in range(num_classes)]
    )
    chosen.sort()
    _, train_features = collect_outputs(model, train, mean, std, device, torch.from_numpy(chosen))
    val_logits, val_features = val_outputs or collect_outputs(model, val, mean, std, device)
    sections = fit_trust(
        val_logits,
        val.targets.numpy(),
        val_features,
        train_features,
        targets[chosen],
        num_classes,
        accept_rate,
    )
    calibration, rule = sections["calibration"], sections["ood"]
    if reliability_png is not None:
        draw_reliability(val_logits, val.targets.numpy(), calibration["temperature"], reliability_png)
    logger.info(
        "Calibrated: temperature %.3f, validation ECE %.2f%% -> %.2f%%; 'none of these' above %s %.4f "
        "(accepts %.0f%% of validation images).",
        calibration["temperature"], 100 * calibration["ece_before"], 100 * calibration["ece_after"],
        rule["method"], rule["threshold"], 100 * rule["val_accepted"],
    )  # fmt: skip
    return sections
