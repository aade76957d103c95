"""Multi-label runs in the prediction and evaluation CLIs: CSV rows with `labels`, and scores on a labels CSV.

`finetune.predict` writes, for a multi-label run, `path,label,prob,error,labels` then one `prob_<label>`
column per label: `labels` holds every label at or above its fitted threshold (most probable first, joined by
';'), `label`/`prob` the most probable one. `finetune.evaluate labels.csv --checkpoint RUN` scores a run on a
labels CSV (the run's own CSV: only its recorded validation images) with mAP, micro/macro F1 and the per-label
report, through the same `classify_files` path as predictions, so the numbers describe what users get.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from finetune.checkpoint import LoadedRun
from finetune.errors import DatasetError
from finetune.multilabel import labels_above, labels_without_images, multilabel_report, summary, thresholds_of

logger = logging.getLogger(__name__)

LABEL_JOIN = ";"  # labels CSVs accept ';' and spaces; ';' also survives label names with spaces


def columns(labels: Sequence[str]) -> list[str]:
    """Header of a multi-label predictions CSV."""
    return ["path", "label", "prob", "error", "labels"] + [f"prob_{label}" for label in labels]


def rows(outcomes: Sequence[Any], labels: Sequence[str], thresholds: np.ndarray) -> list[dict[str, Any]]:
    """One CSV row per `FileOutcome` (unreadable files keep their row, with `error`)."""
    result = []
    for outcome in outcomes:
        row: dict[str, Any] = {"path": str(outcome.item), "label": "", "prob": ""}
        row["error"] = outcome.error or ""
        if outcome.probs is not None:
            top = int(np.argmax(outcome.probs))
            row.update(label=labels[top], prob=f"{outcome.probs[top]:.6f}")
            row["labels"] = LABEL_JOIN.join(labels_above(outcome.probs[None, :], thresholds, labels)[0])
            row.update({f"prob_{label}": f"{p:.6f}" for label, p in zip(labels, outcome.probs, strict=True)})
        result.append(row)
    return result


def predict_rows(
    classifier: Any, files: Sequence[Path], batch_size: int, tta: Sequence[float] | None = None
) -> Iterator[list[dict[str, Any]]]:
    """`finetune.predict`'s rows for a multi-label run, one list per chunk."""
    from finetune.file_predict import classify_files

    thresholds = thresholds_of(classifier.run.config, classifier.labels)
    for outcomes in classify_files(classifier, files, chunk_size=batch_size, tta=tta):
        yield rows(outcomes, classifier.labels, thresholds)


def evaluation_files(run: LoadedRun, csv_path: Path) -> tuple[list[tuple[Path, tuple[int, ...]]], str]:
    """(path, label indices) to score and which subset: the run's validation split when the CSV is its own."""
    from finetune.labels_csv import make_samples, read_csv_split, read_labels_csv

    record = read_csv_split(run.run_dir) if run.run_dir is not None else None
    if record is not None and record.split.csv_path == Path(os.path.abspath(csv_path)):
        samples = record.unchanged(record.split.val)
        if len(samples) < len(record.split.val):
            logger.warning(
                "%d of the run's validation images changed or went missing since training; scoring the %d "
                "unchanged.", len(record.split.val) - len(samples), len(samples),
            )  # fmt: skip
        if not samples:
            raise DatasetError(f"none of the run's validation images in '{csv_path}' is as at training.")
        return [(s.path, s.labels) for s in samples], "val"
    labels, entries = read_labels_csv(csv_path, known_labels=run.labels)
    return [(s.path, s.labels) for s in make_samples(entries, labels)], "csv"


def evaluate_csv(
    csv_path: Path, checkpoint: str, batch_size: int = 32, runtime: str = "auto", tta: str | None = None
) -> tuple[dict[str, Any], np.ndarray, np.ndarray, LoadedRun]:
    """Metrics (mAP, micro_f1, macro_f1, per_label, n, bad_files, subset), targets, probabilities, run."""
    from finetune.checkpoint import load_run
    from finetune.file_predict import classify_files
    from finetune.inference import parse_tta
    from finetune.labels_csv import multi_hot
    from finetune.multilabel import is_multilabel
    from finetune.runtime import create_classifier

    run = load_run(checkpoint)
    if not is_multilabel(run.config):
        raise DatasetError(
            f"'{checkpoint}' is a single-label run; evaluate it on class folders, not on a labels CSV."
        )
    classifier = create_classifier(run, runtime=runtime, batch_size=batch_size)
    files, subset = evaluation_files(run, Path(csv_path))
    parts, label_sets, bad = [], [], []
    opener = lambda item: classifier.open(item[0])  # noqa: E731
    for outcomes in classify_files(classifier, files, opener, chunk_size=batch_size, tta=parse_tta(tta)):
        for outcome in outcomes:
            if outcome.probs is None:
                bad.append({"path": str(outcome.item[0]), "error": outcome.error})
            else:
                parts.append(outcome.probs)
                label_sets.append(outcome.item[1])
    if not parts:
        raise DatasetError(f"none of the {len(files)} images of '{csv_path}' could be read.")
    probs, targets = np.stack(parts), multi_hot(label_sets, len(run.labels)).numpy()
    report = multilabel_report(targets, probs, thresholds_of(run.config, run.labels), run.labels)
    metrics = {
        **summary(report),
        "n": len(parts),
        "per_label": report,
        "labels_without_images": labels_without_images(report),  # left out of mAP and macro averages
        "bad_files": bad,
        "checkpoint": str(checkpoint),
        "subset": subset,  # "csv" (every row) or the run's recorded "val" split
    }
    return metrics, targets, probs, run


def present(probs: np.ndarray, run: LoadedRun) -> Any:
    """The labels one image shows (at or above their thresholds), most probable first, as a `Prediction`.

    The app's Classify tab answers with it: a `{label: probability}` of independent probabilities, which
    need not sum to 1 and may be empty (none of the labels).
    """
    from finetune.inference import Prediction

    thresholds = thresholds_of(run.config, run.labels)
    names = labels_above(probs[None, :], thresholds, run.labels)[0]
    return Prediction(labels=names, probs=[float(probs[run.labels.index(name)]) for name in names])
