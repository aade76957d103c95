"""`python -m finetune.evaluate DATA_DIR --checkpoint RUN_DIR`: top-1/5, per-class report, confusion matrix.

DATA_DIR is a folder of class subfolders named like the run's labels (a subset is fine). Images go through the
same loader and classifier as `finetune.predict` and the app, so the numbers describe what users will get.
When DATA_DIR is the run's own dataset, only the images it held out are evaluated (its recorded test split
when it had a test/ folder, else its validation split, from split.json), so training images never count.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune.cli import configure_logging, run_cli
from finetune.errors import DatasetError
from finetune.images import is_image_file
from finetune.inference import add_inference_arguments

if TYPE_CHECKING:
    from finetune.checkpoint import LoadedRun

logger = logging.getLogger(__name__)

RELIABILITY_FILE = "reliability.png"


def get_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.evaluate",
        description="Evaluate a run on a labelled folder (one subfolder per class, named as its labels).",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("data_dir", type=Path, help="folder of class subfolders")
    parser.add_argument("--checkpoint", required=True, help="run folder (or hf-hub:USER/NAME)")
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object on stdout instead of tables"
    )
    parser.add_argument("--out-dir", type=Path, help="also write confusion_matrix.png and reports there")
    add_inference_arguments(parser)
    return parser


def labelled_files(data_dir: Path, labels: list[str]) -> list[tuple[Path, int]]:
    """(path, label index) for every image under DATA_DIR/<label>/; unknown class folders are an error."""
    if not data_dir.is_dir():
        raise DatasetError(f"dataset folder '{data_dir}' does not exist or is not a folder.")
    folders = sorted(p for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in folders if p.name not in labels]
    if unknown:
        raise DatasetError(
            f"class folder(s) {', '.join(unknown[:5])} in '{data_dir}' are not labels of this run "
            f"({', '.join(labels[:10])}{'...' if len(labels) > 10 else ''})."
        )
    files = [
        (path, labels.index(folder.name))
        for folder in folders
        for path in sorted(folder.rglob("*"))
        if path.is_file() and is_image_file(path)
    ]
    if not files:
        raise DatasetError(f"no images found in the class folders of '{data_dir}'.")
    return files


def held_out_files(run: LoadedRun, data_dir: Path) -> tuple[list[tuple[Path, int]], str] | None:
    """The run's held-out files when DATA_DIR is its own dataset: recorded test split, else validation.

    None when DATA_DIR is another folder. Files changed or removed since training are left out, with a
    warning; none left is a `DatasetError`.
    """
    from finetune.split import read_split

    record = read_split(run.run_dir) if run.run_dir is not None else None
    if record is None or not record.is_dataset(data_dir):
        trained_on = (run.studio.get("train_config") or {}).get("data_dir")
        if record is None and trained_on and Path(trained_on).resolve() == Path(data_dir).resolve():
            logger.warning(
                "%s is the folder this run trained on and the run has no recorded split: the scores include "
                "images it was trained on.", data_dir,
            )  # fmt: skip
        return None
    subset = "test" if any(f.subset == "test" for f in record.files) else "val"
    recorded = record.samples(subset)
    samples = record.unchanged(recorded)
    if len(samples) < len(recorded):
        logger.warning(
            "%d of the run's %s images changed or went missing since training; evaluating the %d unchanged.",
            len(recorded) - len(samples), subset, len(samples),
        )  # fmt: skip
    if not samples:
        raise DatasetError(
            f"none of the run's recorded {subset} images in '{data_dir}' is still as it was at training; "
            "evaluate on another labelled folder."
        )
    if subset == "val" and run.studio.get("probe_refit"):
        logger.warning(
            "This few-shot run refitted its head on its validation images too: these scores are in-sample. "
            "The held-out figures are in config.json (studio.metrics, from the head fitted on training "
            "images alone); a test/ folder gives an unbiased one."
        )
    return [(sample.path, sample.target) for sample in samples], subset


def evaluate_folder(
    data_dir: Path,
    checkpoint: str,
    batch_size: int = 32,
    runtime: str = "auto",
    tta: str | None = None,
    reliability_png: Path | None = None,
) -> tuple[dict[str, Any], np.ndarray, list[str]]:
    """Metrics dict (top1, top5, n, per_class, bad_files, calibration), confusion matrix and labels.

    `reliability_png`: where to draw the reliability diagram (before and after the run's temperature).
    """
    from finetune.checkpoint import load_run
    from finetune.file_predict import classify_files
    from finetune.inference import parse_tta
    from finetune.reports import classes_without_images, classification_report, confusion_matrix
    from finetune.runtime import create_classifier

    run = load_run(checkpoint)
    classifier = create_classifier(run, runtime=runtime, batch_size=batch_size)
    held_out = held_out_files(run, data_dir)
    files, subset = held_out if held_out is not None else (labelled_files(data_dir, run.labels), "folder")
    scales = parse_tta(tta)
    probs_parts, logits_parts, unknown, targets, bad = [], [], [], [], []
    for outcomes in classify_files(
        classifier, files, lambda item: classifier.open(item[0]), chunk_size=batch_size, tta=scales
    ):
        for outcome in outcomes:
            path, target = outcome.item
            if outcome.probs is None:
                bad.append({"path": str(path), "error": outcome.error})
            else:
                probs_parts.append(outcome.probs)
                logits_parts.append(outcome.logits)
                unknown.append(outcome.unknown)
                targets.append(target)
    if not targets:
        raise DatasetError(f"none of the {len(files)} images in '{data_dir}' could be read.")
    probs = np.stack(probs_parts)
    target_array = np.array(targets)
    ranked = np.argsort(-probs, axis=1)[:, :5]
    matrix = confusion_matrix(target_array, ranked[:, 0], len(run.labels))
    report = classification_report(matrix, run.labels)
    metrics = {
        "top1": float((ranked[:, 0] == target_array).mean()),
        "top5": float((ranked == target_array[:, None]).any(axis=1).mean()),
        "n": int(len(target_array)),
        "per_class": report,
        "classes_without_images": classes_without_images(report),  # left out of the macro averages
        "bad_files": bad,
        "checkpoint": str(checkpoint),
        "subset": subset,  # "folder" (all of DATA_DIR), or the run's recorded "test" / "val" split
        "calibration": calibration_report(
            np.stack(logits_parts), probs, target_array, classifier.trust.temperature, reliability_png
        ),
    }
    if all(flag is not None for flag in unknown):  # the run has a rule and rejection is on
        accepted = ~np.array(unknown, bool)
        metrics["rejection"] = {
            "unknown_rate": float(1 - accepted.mean()),  # of in-distribution images: ~1 - accept rate
            "top1_accepted": float((ranked[accepted, 0] == target_array[accepted]).mean())
            if accepted.any()
            else 0.0,
        }
    return metrics, matrix, run.labels


def calibration_report(
    logits: np.ndarray, probs: np.ndarray, targets: np.ndarray, temperature: float, png: Path | None
) -> dict[str, float]:
    """ECE (15 bins) and NLL of the raw softmax ("before") and of what users get ("after": the run's
    temperature, and test-time views when asked); draws `png` when given."""
    from finetune.calibration import ece, nll, plot_reliability
    from finetune.inference import softmax

    raw = softmax(logits.astype(np.float64))
    report = {
        "temperature": temperature,
        "ece_before": ece(raw, targets),
        "ece_after": ece(probs, targets),
        "nll_before": nll(raw, targets),
        "nll_after": nll(probs, targets),
    }
    if png is not None:
        try:
            plot_reliability([("raw softmax", raw), (f"T = {temperature:.2f}", probs)], targets, png)
        except OSError as error:  # a read-only run folder (the Hub cache): the numbers still count
            logger.warning("Could not write %s (%s); pass --out-dir to write it elsewhere.", png, error)
    return report


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    configure_logging(quiet=args.quiet or args.json)
    return run_cli(lambda: _evaluate(args))


def _evaluate(args: argparse.Namespace) -> int:
    from finetune.labels_csv import is_labels_csv
    from finetune.reports import format_report, write_reports

    if is_labels_csv(args.data_dir):  # a multi-label run on a labels CSV (finetune/multilabel_io.py)
        return _evaluate_csv(args)
    metrics, matrix, labels = evaluate_folder(
        args.data_dir, args.checkpoint, args.batch_size, args.runtime, args.tta, _reliability_path(args)
    )
    if args.out_dir is not None:
        write_reports(args.out_dir, matrix, labels)
    if args.json:
        json.dump(metrics, sys.stdout)
        sys.stdout.write("\n")
        return 0
    subset = {"test": " (the run's held-out test split)", "val": " (the run's validation split)"}
    print(
        f"top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  on {metrics['n']} images"
        f"{subset.get(metrics['subset'], '')}\n"
    )
    print(format_report(metrics["per_class"]))
    if metrics["classes_without_images"]:
        missing = ", ".join(metrics["classes_without_images"])
        print(f"macro averages leave out classes without images here: {missing}")
    if len(labels) <= 20:
        width = max(len(label) for label in labels)
        print("confusion matrix (rows: true, columns: predicted)")
        for label, row in zip(labels, matrix, strict=True):
            print(f"{label:>{width}}  " + " ".join(f"{count:4d}" for count in row))
    calibration = metrics["calibration"]
    print(
        f"\ncalibration (temperature {calibration['temperature']:.3f}): "
        f"ECE {calibration['ece_before']:.2%} -> {calibration['ece_after']:.2%}, "
        f"NLL {calibration['nll_before']:.4f} -> {calibration['nll_after']:.4f}"
    )
    if "rejection" in metrics:
        rejection = metrics["rejection"]
        print(
            f"'none of these': {rejection['unknown_rate']:.1%} of these images flagged unknown; "
            f"top-1 on the others {rejection['top1_accepted']:.4f}"
        )
    if metrics["bad_files"]:
        print(f"\n{len(metrics['bad_files'])} file(s) could not be read; first: {metrics['bad_files'][0]}")
    return 0


def _reliability_path(args: argparse.Namespace) -> Path | None:
    """reliability.png in --out-dir, else in the run folder (a local one: Hub snapshots stay untouched)."""
    if args.out_dir is not None:
        return Path(args.out_dir) / RELIABILITY_FILE
    if str(args.checkpoint).startswith("hf-hub:"):
        return None
    return Path(args.checkpoint) / RELIABILITY_FILE


def _evaluate_csv(args: argparse.Namespace) -> int:
    from finetune.multilabel import format_report, write_reports
    from finetune.multilabel_io import evaluate_csv

    metrics, targets, probs, run = evaluate_csv(
        args.data_dir, args.checkpoint, args.batch_size, args.runtime, args.tta
    )
    if args.out_dir is not None:
        thresholds = [metrics["per_label"][label]["threshold"] for label in run.labels]
        write_reports(args.out_dir, targets, probs, np.array(thresholds), run.labels)
    if args.json:
        json.dump(metrics, sys.stdout)
        sys.stdout.write("\n")
        return 0
    subset = " (the run's validation split)" if metrics["subset"] == "val" else ""
    print(
        f"mAP {metrics['mAP']:.4f}  micro F1 {metrics['micro_f1']:.4f}  macro F1 {metrics['macro_f1']:.4f}  "
        f"on {metrics['n']} images{subset}\n"
    )
    print(format_report(metrics["per_label"]))
    if metrics["bad_files"]:
        print(f"\n{len(metrics['bad_files'])} file(s) could not be read; first: {metrics['bad_files'][0]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
