"""`python -m finetune.predict PATH... [--checkpoint RUN_DIR]`: classify files and folders into CSV rows.

One row per image with `path`, `label`, `prob`, `error` and the top-k (`top1_label`, `top1_prob`, ...). A file
that cannot be read gets its row with `error` filled in; the others are still classified. Without
`--checkpoint`, the embedded ImageNet model answers with readable ImageNet class names.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import torch

from finetune.cli import configure_logging, run_cli
from finetune.distributed import init_distributed, shutdown_distributed
from finetune.images import is_image_file
from finetune.inference import add_inference_arguments, available_cores, parse_tta
from finetune.safe_text import csv_safe_row

BASE_COLUMNS = ["path", "label", "prob", "error"]
TRUST_COLUMNS = ["ood_score", "unknown"]  # after the top-k: higher = further from the classes; true/false


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
) -> Iterator[list[dict[str, Any]]]:
    """CSV rows in input order, one list per chunk of `batch_size` files; unreadable files get `error`."""
    from finetune.file_predict import classify_files
    from finetune.inference import top_k as rank

    for outcomes in classify_files(classifier, files, chunk_size=batch_size, tta=tta):
        good = [outcome.probs for outcome in outcomes if outcome.probs is not None]
        predictions = iter(rank(np.stack(good), classifier.labels, top_k) if good else [])
        rows = []
        for outcome in outcomes:
            row: dict[str, Any] = {
                "path": str(outcome.item),
                "label": "",
                "prob": "",
                "error": outcome.error or "",
            }
            if outcome.ood_score is not None:
                row["ood_score"] = f"{outcome.ood_score:.6f}"
            if outcome.unknown is not None:
                row["unknown"] = "true" if outcome.unknown else "false"
            if outcome.probs is not None:
                prediction = next(predictions)
                row.update(label=prediction.label, prob=f"{prediction.prob:.6f}")
                for rank_index, (label, prob) in enumerate(
                    zip(prediction.labels, prediction.probs, strict=True), 1
                ):
                    row[f"top{rank_index}_label"] = label
                    row[f"top{rank_index}_prob"] = f"{prob:.6f}"
            rows.append(row)
        yield rows


def columns(top_k: int) -> list[str]:
    """Header: the fixed columns, label/prob pairs for each rank, then the OOD score and verdict."""
    ranks = [f"top{i}_{kind}" for i in range(1, top_k + 1) for kind in ("label", "prob")]
    return BASE_COLUMNS + ranks + TRUST_COLUMNS


def main(argv: list[str] | None = None) -> int:
    args = get_parser().parse_args(argv)
    configure_logging(args.quiet)
    return run_cli(lambda: _predict(args))


def _predict(args: argparse.Namespace) -> int:
    from finetune.checkpoint import load_checkpoint_or_default
    from finetune.errors import ConfigError
    from finetune.runtime import create_classifier

    if args.top_k < 1:
        raise ConfigError(f"invalid --top-k {args.top_k}; use 1 or more.")
    dist = init_distributed("cpu")
    if dist.is_distributed and args.out is None:
        raise ConfigError("under torchrun, pass --out FILE.csv: each process writes its part, then one CSV.")
    files = expand_paths(args.paths)
    if not files:
        raise ConfigError(f"no image files found in {', '.join(str(p) for p in args.paths)}.")
    if dist.is_distributed:
        _share_cores(dist.local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", dist.world_size)))
    run = load_checkpoint_or_default(args.checkpoint)
    if not dist.is_main:
        dist.barrier()  # rank 0 exports (or quantizes) once; the others then find its file
    classifier = create_classifier(run, runtime=args.runtime, batch_size=args.batch_size)
    classifier.set_reject(args.reject)
    if dist.is_main:
        dist.barrier()
    top_k = min(args.top_k, len(run.labels))
    tta = parse_tta(args.tta)
    if getattr(classifier, "is_multilabel", False):
        top_k = -1  # no top-k: `labels` and every label's probability (finetune/multilabel_io.py)
    if args.out is None:
        return _write_csv(sys.stdout, classifier, files, top_k, args.batch_size, tta, args.quiet)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    share = files[shard(len(files), dist.rank, dist.world_size)]
    part = part_path(args.out, dist.rank, dist.world_size)
    with part.open("w", newline="", encoding="utf-8") as stream:
        status = _write_csv(
            stream, classifier, share, top_k, args.batch_size, tta, args.quiet or not dist.is_main
        )
    if dist.is_distributed:
        dist.barrier()  # every part is complete before rank 0 joins them
        if dist.is_main:
            merge_parts(
                args.out, [part_path(args.out, rank, dist.world_size) for rank in range(dist.world_size)]
            )
        shutdown_distributed()
    if dist.is_main:
        print(f"Wrote {len(files)} rows to {args.out}", file=sys.stderr)
    return status


def _share_cores(local_rank: int, local_world_size: int) -> None:
    """The processes of a node split its cores (every `local_world_size`-th core from `local_rank`).

    Each process would otherwise size PyTorch's, ONNX Runtime's and the decoders' threads to every core, and
    N processes would run N times as many threads as cores. Pinning also bounds ORT, which reads the
    process's affinity (`available_cores`) when it creates its session.
    """
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    mine = cores[local_rank % max(1, len(cores)) :: local_world_size] if cores else []
    if mine:
        os.sched_setaffinity(0, mine)
    torch.set_num_threads(max(1, len(mine) or (available_cores() // local_world_size)))


def shard(count: int, rank: int, world_size: int) -> slice:
    """This process's contiguous share of the files, so the parts joined in rank order are in input order."""
    per_rank = -(-count // world_size)
    return slice(rank * per_rank, min(count, (rank + 1) * per_rank))


def part_path(out: Path, rank: int, world_size: int) -> Path:
    """Where one process streams its rows: `out` itself for a single process, else a part file beside it."""
    return out if world_size == 1 else out.with_name(f"{out.name}.part{rank}-of-{world_size}")


def merge_parts(out: Path, parts: Sequence[Path]) -> None:
    """Join the parts in rank order under one header (each part has its own), then remove them."""
    import shutil

    with out.open("w", newline="", encoding="utf-8") as merged:
        for number, part in enumerate(parts):
            with part.open(encoding="utf-8", newline="") as stream:
                header = stream.readline()
                if number == 0:
                    merged.write(header)
                shutil.copyfileobj(stream, merged)
    for part in parts:
        part.unlink()


def _write_csv(
    stream: TextIO,
    classifier: Any,
    files: Sequence[Path],
    top_k: int,
    batch_size: int,
    tta: Any,
    quiet: bool = False,
) -> int:
    """Stream rows as they come, flushed per chunk: a crash at file 900,000 keeps the rows before it."""
    from tqdm import tqdm

    if top_k == -1:  # a multi-label run
        from finetune import multilabel_io

        fieldnames = multilabel_io.columns(classifier.labels)
        chunks = multilabel_io.predict_rows(classifier, files, batch_size, tta)
    else:
        fieldnames, chunks = columns(top_k), predict_rows(classifier, files, top_k, batch_size, tta)
    writer = csv.DictWriter(stream, fieldnames=fieldnames, extrasaction="ignore")
    writer.writeheader()
    failures = 0
    with tqdm(total=len(files), unit="img", disable=quiet, file=sys.stderr, desc="predict") as bar:
        for rows in chunks:
            for row in rows:
                writer.writerow(csv_safe_row(row))  # a file or class named "=HYPERLINK(...)" stays text
                failures += bool(row["error"])
            stream.flush()
            bar.update(len(rows))
    if failures:
        print(
            f"{failures} of {len(files)} file(s) could not be classified (see the error column).",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
