"""What a run folder says about a model: per-epoch metrics, confusion matrix, per-class report and plots.

Plots use matplotlib's Agg backend (no display needed) and are written atomically like everything else.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.checkpoint import atomic_write, write_json

METRICS_FILE = "metrics.json"
REPORT_JSON = "classification_report.json"
REPORT_TEXT = "classification_report.txt"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion_matrix.png"


def confusion_matrix(targets: Sequence[int], predictions: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts with true classes as rows and predicted classes as columns."""
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets, dtype=np.int64), np.asarray(predictions, dtype=np.int64)), 1)
    return matrix


def classification_report(matrix: np.ndarray, labels: Sequence[str]) -> dict[str, dict[str, float]]:
    """Precision, recall, F1 and support per class, plus macro and weighted averages.

    The macro average is over the classes that have images in this set: a class with none has no recall to
    speak of, and counting it as 0 (scikit-learn's default) would make perfect predictions score below 1.
    `classes_without_images` names the classes left out.
    """
    true_positive = np.diag(matrix).astype(float)
    predicted = matrix.sum(axis=0).astype(float)
    support = matrix.sum(axis=1).astype(float)
    precision = np.divide(true_positive, predicted, out=np.zeros_like(true_positive), where=predicted > 0)
    recall = np.divide(true_positive, support, out=np.zeros_like(true_positive), where=support > 0)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    report: dict[str, dict[str, float]] = {}
    for index, label in enumerate(labels):
        report[label] = {
            "precision": float(precision[index]),
            "recall": float(recall[index]),
            "f1": float(f1[index]),
            "support": int(support[index]),
        }
    total = max(support.sum(), 1.0)
    present = support > 0
    for name, weights in (
        ("macro avg", present / max(present.sum(), 1)),
        ("weighted avg", support / total),
    ):
        report[name] = {
            "precision": float((precision * weights).sum()),
            "recall": float((recall * weights).sum()),
            "f1": float((f1 * weights).sum()),
            "support": int(support.sum()),
        }
    return report


def classes_without_images(report: dict[str, dict[str, float]]) -> list[str]:
    """Classes of a `classification_report` that had no image in the evaluated set (left out of macro)."""
    return [name for name, row in report.items() if not name.endswith(" avg") and row["support"] == 0]


def format_report(report: dict[str, dict[str, float]]) -> str:
    """A fixed-width table like scikit-learn's, for terminals and the run folder."""
    width = max([len(name) for name in report] + [12])
    lines = [f"{'':<{width}}  precision     recall   f1-score    support"]
    for name, row in report.items():
        if name == "macro avg":
            lines.append("")
        lines.append(
            f"{name:<{width}}  {row['precision']:9.3f}  {row['recall']:9.3f}  {row['f1']:9.3f}  "
            f"{row['support']:9d}"
        )
    return "\n".join(lines) + "\n"


def write_reports(
    run_dir: Path, matrix: np.ndarray, labels: Sequence[str], prefix: str = ""
) -> dict[str, dict[str, float]]:
    """classification_report.json/.txt and confusion_matrix.png for the final model.

    `prefix` "test_" writes the test set's reports beside the validation ones.
    """
    report = classification_report(matrix, labels)
    write_json(run_dir / f"{prefix}{REPORT_JSON}", report)
    text = format_report(report)
    atomic_write(run_dir / f"{prefix}{REPORT_TEXT}", lambda tmp: tmp.write_text(text, encoding="utf-8"))
    plot_confusion_matrix(matrix, labels, run_dir / f"{prefix}{CONFUSION_PNG}")
    return report


def write_history(run_dir: Path, history: Sequence[dict[str, Any]]) -> None:
    """metrics.json (one entry per epoch) and curves.png, refreshed after every epoch."""
    write_json(run_dir / METRICS_FILE, {"epochs": list(history)})
    if history:
        plot_curves(history, run_dir / CURVES_PNG)


def plot_curves(history: Sequence[dict[str, Any]], path: Path) -> None:
    """Loss and accuracy per epoch, train and validation; the probe is epoch 0."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    epochs = [row["epoch"] for row in history]
    figure = Figure(figsize=(10, 4), dpi=100)
    loss_axis, acc_axis = figure.subplots(1, 2)
    for key, name in (("train_loss", "train"), ("val_loss", "validation")):
        points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if row.get(key) is not None]
        if points:
            loss_axis.plot(*zip(*points, strict=True), marker="o", label=name)
    scores = (("train_acc", "train"), ("val_top1", "validation top-1"), ("val_map", "validation mAP"))
    for key, name in scores:
        points = [(e, row[key]) for e, row in zip(epochs, history, strict=True) if row.get(key) is not None]
        if points:
            acc_axis.plot(*zip(*points, strict=True), marker="o", label=name)
    loss_axis.set(title="Loss", xlabel="epoch (0 = linear probe)", ylabel="cross-entropy")
    acc_axis.set(title="Accuracy", xlabel="epoch (0 = linear probe)", ylabel="accuracy", ylim=(0, 1.02))
    from matplotlib.ticker import MaxNLocator

    for axis in (loss_axis, acc_axis):
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))


def plot_confusion_matrix(matrix: np.ndarray, labels: Sequence[str], path: Path) -> None:
    """Row-normalised confusion matrix with counts, readable up to a few dozen classes."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    count = len(labels)
    side = min(4 + 0.45 * count, 24)
    figure = Figure(figsize=(side, side * 0.85), dpi=100)
    axis = figure.subplots()
    rows = matrix.sum(axis=1, keepdims=True)
    normalised = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    image = axis.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
    axis.set(
        xticks=range(count), yticks=range(count), xlabel="predicted", ylabel="true", title="Confusion matrix"
    )
    axis.set_xticklabels(labels, rotation=45, ha="right", fontsize=8 if count > 12 else 10)
    axis.set_yticklabels(labels, fontsize=8 if count > 12 else 10)
    if count <= 30:
        for row in range(count):
            for column in range(count):
                if matrix[row, column]:
                    color = "white" if normalised[row, column] > 0.5 else "black"
                    axis.text(
                        column,
                        row,
                        str(matrix[row, column]),
                        ha="center",
                        va="center",
                        color=color,
                        fontsize=8,
                    )
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
