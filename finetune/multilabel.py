"""Multi-label models: the sigmoid/BCE objective, per-label thresholds and the mAP / F1 metrics, in one place.

A multi-label run is an ordinary run whose outputs are independent logits, one per label, read through a
sigmoid: an image may show several labels or none. Training (finetune/multilabel_train.py) and every reader
of runs use what is here; inference needs only `is_multilabel(config)`, `sigmoid` and `thresholds_of(config)`:
what the run stores under `studio.multilabel` in config.json.

Scores: mAP is the mean over labels of average precision (scikit-learn's step-wise definition, no
interpolation); it ranks, so it chooses the kept weights without any threshold. Each label's threshold is then
the one that maximises its F1 on the validation split, and micro/macro F1 are measured at those thresholds.
Labels without a positive image in a set have no AP or recall there and are left out of the macro averages.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.checkpoint import atomic_write, write_json

logger = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # for a label with no positive validation image to fit one on
REPORT_JSON = "classification_report.json"  # the names single-label runs use, so tools find them
REPORT_TEXT = "classification_report.txt"
PR_CURVES_PNG = "pr_curves.png"


def is_multilabel(config: dict[str, Any]) -> bool:
    """Whether a run's config.json describes a multi-label (sigmoid) model."""
    return bool((config.get("studio") or {}).get("multilabel"))


def thresholds_of(config: dict[str, Any], labels: Sequence[str]) -> np.ndarray:
    """Each label's decision threshold from config.json, in label order (0.5 where none was fitted)."""
    saved = ((config.get("studio") or {}).get("multilabel") or {}).get("thresholds") or {}
    return np.array([float(saved.get(label, DEFAULT_THRESHOLD)) for label in labels], dtype=np.float64)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    """Independent probabilities of (N, L) logits, stable for large magnitudes."""
    small = np.exp(-np.abs(logits))
    return np.where(logits >= 0, 1 / (1 + small), small / (1 + small))


def labels_above(probs: np.ndarray, thresholds: np.ndarray, labels: Sequence[str]) -> list[list[str]]:
    """For each row, the labels whose probability reaches their threshold, most probable first."""
    result = []
    for row in np.asarray(probs):
        chosen = [i for i in np.argsort(-row, kind="stable") if row[i] >= thresholds[i]]
        result.append([labels[i] for i in chosen])
    return result


def average_precision(targets: np.ndarray, scores: np.ndarray) -> float:
    """AP of one label: sum over score thresholds of (R_n - R_{n-1}) * P_n (scikit-learn's definition).

    NaN when the label has no positive image: recall, and so AP, is undefined there.
    """
    targets = np.asarray(targets, dtype=np.float64)
    if targets.sum() == 0:
        return float("nan")
    order = np.argsort(-np.asarray(scores), kind="mergesort")
    sorted_scores, sorted_targets = np.asarray(scores)[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_pos = np.cumsum(sorted_targets)[last_of_tie]
    precision = true_pos / (last_of_tie + 1)
    recall = true_pos / true_pos[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fit_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The probability threshold (predict positive at >= it) with the best F1 on these images.

    Candidates lie halfway between consecutive distinct scores, so a threshold separates the images it was
    fitted on by a margin rather than sitting on one of them; ties in F1 go to the higher threshold (fewer
    false alarms). A label without positives keeps DEFAULT_THRESHOLD.
    """
    targets = np.asarray(targets, dtype=np.float64)
    positives = targets.sum()
    if positives == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    sorted_scores, sorted_targets = np.asarray(scores, dtype=np.float64)[order], targets[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(sorted_scores)), len(sorted_scores) - 1]
    true_pos = np.cumsum(sorted_targets)[last_of_tie]
    predicted = last_of_tie + 1
    f1 = 2 * true_pos / (predicted + positives)
    best = int(np.argmax(f1))  # first maximum: the highest threshold among equals
    lower = sorted_scores[last_of_tie[best] + 1] if last_of_tie[best] + 1 < len(sorted_scores) else 0.0
    return float((sorted_scores[last_of_tie[best]] + lower) / 2)


def fit_thresholds(targets: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One F1-maximising threshold per label (column)."""
    return np.array([fit_threshold(targets[:, i], probs[:, i]) for i in range(probs.shape[1])])


def multilabel_report(
    targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Per label precision, recall, F1, AP, threshold and support; then micro and macro averages.

    The macro average (and mAP) is over labels with a positive image in this set; `labels_without_images`
    names the others.
    """
    targets = np.asarray(targets) > 0.5
    predicted = np.asarray(probs) >= thresholds[None, :]
    true_pos = (predicted & targets).sum(axis=0).astype(float)
    n_predicted, support = predicted.sum(axis=0).astype(float), targets.sum(axis=0).astype(float)
    precision = np.divide(true_pos, n_predicted, out=np.zeros_like(true_pos), where=n_predicted > 0)
    recall = np.divide(true_pos, support, out=np.zeros_like(true_pos), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    ap = np.array([average_precision(targets[:, i], probs[:, i]) for i in range(len(labels))])
    report: dict[str, dict[str, float]] = {}
    for i, label in enumerate(labels):
        report[label] = {
            "precision": float(precision[i]), "recall": float(recall[i]), "f1": float(f1[i]),
            "ap": None if np.isnan(ap[i]) else float(ap[i]), "threshold": float(thresholds[i]),
            "support": int(support[i]),
        }  # fmt: skip
    micro_p = true_pos.sum() / max(n_predicted.sum(), 1)
    micro_r = true_pos.sum() / max(support.sum(), 1)
    report["micro avg"] = {
        "precision": float(micro_p), "recall": float(micro_r),
        "f1": float(2 * micro_p * micro_r / (micro_p + micro_r)) if micro_p + micro_r else 0.0,
        "support": int(support.sum()),
    }  # fmt: skip
    present = support > 0
    report["macro avg"] = {
        "precision": float(precision[present].mean()) if present.any() else 0.0,
        "recall": float(recall[present].mean()) if present.any() else 0.0,
        "f1": float(f1[present].mean()) if present.any() else 0.0,
        "ap": float(np.nanmean(ap)) if present.any() else 0.0,
        "support": int(support.sum()),
    }
    return report


def summary(report: dict[str, dict[str, float]]) -> dict[str, float]:
    """The headline numbers of a `multilabel_report`: mAP, micro F1 and macro F1."""
    return {
        "mAP": report["macro avg"]["ap"],
        "micro_f1": report["micro avg"]["f1"],
        "macro_f1": report["macro avg"]["f1"],
    }


def labels_without_images(report: dict[str, dict[str, float]]) -> list[str]:
    """Labels of a report with no positive image in the set (left out of mAP and macro averages)."""
    return [name for name, row in report.items() if not name.endswith(" avg") and row["support"] == 0]


def format_report(report: dict[str, dict[str, float]]) -> str:
    """A fixed-width table (precision, recall, F1, AP, threshold, support) for terminals and run folders."""
    width = max([len(name) for name in report] + [12])
    lines = [f"{'':<{width}}  precision     recall   f1-score         AP  threshold    support"]
    for name, row in report.items():
        if name == "micro avg":
            lines.append("")
        ap = "" if row.get("ap") is None else f"{row['ap']:9.3f}"
        threshold = f"{row['threshold']:9.3f}" if "threshold" in row else ""
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:9.3f}  {row['f1']:9.3f}  {ap:>9}  "
            f"{threshold:>9}  {row['support']:9d}"
        )
    return "\n".join(lines) + "\n"


def write_reports(
    out_dir: Path,
    targets: np.ndarray,
    probs: np.ndarray,
    thresholds: np.ndarray,
    labels: Sequence[str],
    prefix: str = "",
) -> dict[str, dict[str, float]]:
    """classification_report.json/.txt and pr_curves.png (one precision-recall curve per label)."""
    report = multilabel_report(targets, probs, thresholds, labels)
    write_json(Path(out_dir) / f"{prefix}{REPORT_JSON}", report)
    text = format_report(report)
    atomic_write(Path(out_dir) / f"{prefix}{REPORT_TEXT}", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plot_pr_curves(targets, probs, thresholds, labels, Path(out_dir) / f"{prefix}{PR_CURVES_PNG}")
    return report


def plot_pr_curves(
    targets: np.ndarray, probs: np.ndarray, thresholds: np.ndarray, labels: Sequence[str], path: Path
) -> None:
    """Precision against recall for every label, with a dot at its chosen threshold."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 6), dpi=100)
    axis = figure.subplots()
    targets = np.asarray(targets) > 0.5
    for i, label in enumerate(labels[:40]):  # past 40 curves nobody can tell them apart
        if not targets[:, i].any():
            continue
        order = np.argsort(-probs[:, i], kind="mergesort")
        hits = np.cumsum(targets[order, i])
        precision, recall = hits / np.arange(1, len(order) + 1), hits / hits[-1]
        ap = average_precision(targets[:, i], probs[:, i])
        (line,) = axis.plot(recall, precision, label=f"{label} (AP {ap:.2f})")
        chosen = probs[:, i] >= thresholds[i]
        tp = (chosen & targets[:, i]).sum()
        if chosen.any():
            axis.plot([tp / targets[:, i].sum()], [tp / chosen.sum()], "o", color=line.get_color())
    axis.set(title="Precision-recall per label (dot: chosen threshold)", xlabel="recall", ylabel="precision",
             xlim=(0, 1.02), ylim=(0, 1.02))  # fmt: skip
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
