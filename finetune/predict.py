"""`python -m finetune.predict PATH... [--checkpoint RUN_DIR]`: classify files and folders into CSV rows.

One row per image with `path`, `label`, `prob`, `error` and the top-k (`top1_label`, `top1_prob`, ...). A file
that cannot be read gets its row with `error` filled in; the others are still classified. Without
`--checkpoint`, the embedded ImageNet model answers with readable ImageNet class names.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from finetune.cli import configure_logging, run_cli
from finetune.errors import ImageError
from finetune.images import is_image_file
from finetune.inference import add_inference_arguments, parse_tta
from finetune.safe_text import csv_safe_row

BASE_COLUMNS = ["path", "label", "prob", "error"]


def get_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.predict",
        description="Classify images (files, or folders searched recursively); one CSV row per image.",
        add_help=add_help,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("paths", nargs="+", type=Path, help="image files and/or folders")
    parser.add_argument(
        "--checkpoint", help="run folder or hf-hub:USER/NAME (default: embedded ImageNet model)"
    )
    parser.add_argument("--top-k", type=int, default=5, help="how many classes to list per image")
    parser.add_argument("--out", type=Path, help="CSV file to write (default: stdout)")
    add_inference_arguments(parser)
    return parser


def expand_paths(paths: Sequence[Path]) -> list[Path]:
    """Files as given; folders become their image files, sorted, searched recursively."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)))
        else:
            files.append(path)  # a missing or non-image file still gets a row with its error
    return files


def predict_rows(
    classifier: Any, files: Sequence[Path], top_k: int, batch_size: int, tta: Sequence[float] | None = None
) -> Iterator[dict[str, Any]]:
    """CSV rows in input order, classifying in batches; unreadable files yield a row with `error`."""
    from finetune.inference import top_k as rank

    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images, errors = {}, {}
        for index, path in enumerate(chunk):
            try:
                images[index] = classifier.open(path)
            except ImageError as error:
                errors[index] = str(error)
        probs = classifier.predict_probs(list(images.values()), tta=tta)
        predictions = iter(rank(probs, classifier.labels, top_k))
        for index, path in enumerate(chunk):
            row: dict[str, Any] = {"path": str(path), "label": "", "prob": "", "error": errors.get(index, "")}
            if index in images:
                prediction = next(predictions)
                row.update(label=prediction.label, prob=f"{prediction.prob:.6f}")
                for rank_index, (label, prob) in enumerate(
                    zip(prediction.labels, prediction.probs, strict=True), 1
                ):
                    row[f"top{rank_index}_label"] = label
                    row[f"top{rank_index}_prob"] = f"{prob:.6f}"
            yield row


def columns(top_k: int) -> list[str]:
    """Header: the fixed columns, then label/prob pairs for each rank."""
    return BASE_COLUMNS + [f"top{i}_{kind}" for i in range(1, top_k + 1) for kind in ("label", "prob")]


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    configure_logging(args.quiet)
    return run_cli(lambda: _predict(args))


def _predict(args: argparse.Namespace) -> int:
    from finetune.checkpoint import load_checkpoint_or_default
    from finetune.errors import ConfigError
    from finetune.inference import create_classifier

    if args.top_k < 1:
        raise ConfigError(f"invalid --top-k {args.top_k}; use 1 or more.")
    files = expand_paths(args.paths)
    if not files:
        raise ConfigError(f"no image files found in {', '.join(str(p) for p in args.paths)}.")
    run = load_checkpoint_or_default(args.checkpoint)
    classifier = create_classifier(run, runtime=args.runtime, batch_size=args.batch_size)
    top_k = min(args.top_k, len(run.labels))
    tta = parse_tta(args.tta)
    if args.out is None:
        return _write_csv(sys.stdout, classifier, files, top_k, args.batch_size, tta)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", newline="", encoding="utf-8") as stream:
        status = _write_csv(stream, classifier, files, top_k, args.batch_size, tta)
    print(f"Wrote {len(files)} rows to {args.out}", file=sys.stderr)
    return status


def _write_csv(
    stream: TextIO, classifier: Any, files: Sequence[Path], top_k: int, batch_size: int, tta: Any
) -> int:
    writer = csv.DictWriter(stream, fieldnames=columns(top_k), extrasaction="ignore")
    writer.writeheader()
    failures = 0
    for row in predict_rows(classifier, files, top_k, batch_size, tta):
        writer.writerow(csv_safe_row(row))  # a file or class named "=HYPERLINK(...)" stays text
        failures += bool(row["error"])
    if failures:
        print(
            f"{failures} of {len(files)} file(s) could not be classified (see the error column).",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
