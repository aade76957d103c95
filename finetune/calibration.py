"""Calibrated confidence: temperature scaling fitted on validation logits, and the numbers that judge it.

Modern networks (and label smoothing) make softmax probabilities too sure, or not sure enough: "98%" is not
right 98% of the time. Temperature scaling (Guo et al., 2017) divides the logits by one scalar T fitted to
minimise the negative log-likelihood of the validation split; it never changes which class ranks first, so
accuracy is untouched. The fitted T is stored in the run's config.json and applied by `finetune.inference`
for every runtime. ECE (15 equal-width confidence bins) and NLL say how good the probabilities are.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from finetune.checkpoint import atomic_write

ECE_BINS = 15
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0  # a T outside this means the fit went wrong, not a real model


def fit_temperature(logits: np.ndarray, targets: np.ndarray, steps: int = 50) -> float:
    """The temperature T > 0 that minimises NLL of softmax(logits / T) on (logits, targets).

    LBFGS on log T (so T stays positive), from T = 1; a handful of iterations converge on one scalar.
    Returns 1.0 when there is nothing to fit (no rows).
    """
    if len(targets) == 0:
        return 1.0
    logit_tensor = torch.as_tensor(np.asarray(logits, np.float64))
    target_tensor = torch.as_tensor(np.asarray(targets, np.int64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logit_tensor / log_t.exp(), target_tensor)
        loss.backward()
        return loss

    optimizer.step(closure)
    temperature = float(log_t.detach().exp())
    if not math.isfinite(temperature):
        return 1.0
    return min(MAX_TEMPERATURE, max(MIN_TEMPERATURE, temperature))


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """softmax(logits / T) over the last axis, numerically stable."""
    scaled = np.asarray(logits, np.float64) / temperature
    scaled -= scaled.max(axis=-1, keepdims=True)
    exp = np.exp(scaled)
    return exp / exp.sum(axis=-1, keepdims=True)


def nll(probs: np.ndarray, targets: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (natural log)."""
    picked = np.asarray(probs)[np.arange(len(targets)), np.asarray(targets)]
    return float(-np.log(np.clip(picked, 1e-12, None)).mean()) if len(targets) else 0.0


def reliability_bins(
    probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per confidence bin (equal width over [0, 1]): image count, mean confidence and accuracy."""
    confidence = np.asarray(probs).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(targets)
    # bin b holds confidences in (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    safe = np.maximum(counts, 1)
    mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / safe
    accuracy = np.bincount(index, weights=correct.astype(float), minlength=bins) / safe
    return counts, mean_confidence, accuracy


def ece(probs: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: the image-weighted mean |accuracy - confidence| over confidence bins."""
    if len(targets) == 0:
        return 0.0
    counts, confidence, accuracy = reliability_bins(probs, targets, bins)
    return float((counts * np.abs(accuracy - confidence)).sum() / counts.sum())


def calibration_figures(logits: np.ndarray, targets: np.ndarray, temperature: float) -> dict[str, float]:
    """ECE and NLL of `logits` before (T = 1) and after temperature scaling, for reports and the card."""
    before, after = softmax_t(logits), softmax_t(logits, temperature)
    return {
        "ece_before": ece(before, targets),
        "ece_after": ece(after, targets),
        "nll_before": nll(before, targets),
        "nll_after": nll(after, targets),
    }


def plot_reliability(
    curves: Sequence[tuple[str, np.ndarray]], targets: np.ndarray, path: Path, bins: int = ECE_BINS
) -> None:
    """A reliability diagram: accuracy against confidence per bin, one line per (name, probs), written
    atomically to `path` (PNG). A calibrated model follows the diagonal."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 5), dpi=100)
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfect calibration")
    for name, probs in curves:
        counts, confidence, accuracy = reliability_bins(probs, targets, bins)
        used = counts > 0
        label = f"{name} (ECE {ece(probs, targets, bins):.1%})"
        axes.plot(confidence[used], accuracy[used], marker="o", label=label)
    axes.set_xlim(0, 1)
    axes.set_ylim(0, 1.02)
    axes.set_xlabel("confidence (top-1 probability)")
    axes.set_ylabel("accuracy")
    axes.set_title(f"Reliability ({len(targets)} images, {bins} bins)")
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    atomic_write(Path(path), lambda tmp: figure.savefig(tmp, format="png"))
