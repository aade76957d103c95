"""`python -m finetune.inspect DATA_DIR [--checkpoint RUN] [--out REPORT_DIR]`: check a dataset.

The same checks run at the start of every training (`inspect_training_data`, called by the trainer with
the linear probe's features), so a run folder always holds data_report.html/json. Standalone, this decodes
the images exactly as a training would (same resolution plan, same cache code), extracts frozen-backbone
features with the default model (or a run's, with `--checkpoint`, which also adds the run's top losses on
its validation images) and writes the report. Nothing in DATA_DIR is moved, changed or deleted.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from finetune.data import VAL_MAX_IMAGES, DatasetSplit, scan_dataset
from finetune.data_health import FileRef, HealthInput, check_data, pixel_signatures
from finetune.data_report import (
    add_training_results,
    build_report,
    read_exclusions,
    read_report,
    summary_line,
    write_report,
    write_top_losses_png,
)
from finetune.errors import ImageError
from finetune.pixel_cache import CachedImages, build_cache

logger = logging.getLogger(__name__)


def relative_path(path: Path, data_dir: Path) -> str:
    """`path` relative to `data_dir` (POSIX), as split.json and the report name files."""
    return Path(os.path.abspath(path)).relative_to(os.path.abspath(data_dir)).as_posix()


def inspect_training_data(
    data_dir: Path,
    classes: Sequence[str],
    caches: Mapping[str, CachedImages],
    features: Mapping[str, torch.Tensor],
    out_dir: Path,
    model_name: str,
    image_size: int,
    digests: Mapping[str, str] | None = None,
    seed: int = 0,
) -> tuple[dict[str, Any], Path]:
    """Run every check on the decoded subsets and write the report into `out_dir`.

    Subsets with `features` (train, val) get every check; the others (a test/ folder the probe does not
    extract) take part in the hash and size checks, so a test image copied from training is still found.
    `digests` maps relative paths to SHA-256 (split.json's); missing ones are hashed here.
    """
    from finetune.images import image_size as header_size
    from finetune.split import hash_files

    ordered = [name for name in caches if name in features] + [n for n in caches if n not in features]
    files, paths = [], []
    for name in ordered:
        cache = caches[name]
        for path, target in zip(cache.paths, cache.targets.tolist(), strict=True):
            files.append(FileRef(relative_path(path, data_dir), classes[target], name))
            paths.append(path)
    known = dict(digests or {})
    missing = [i for i, ref in enumerate(files) if ref.path not in known]
    for i, digest in zip(missing, hash_files([paths[i] for i in missing]), strict=True):
        known[files[i].path] = digest
    sizes: list[tuple[int, int] | None] = []
    for path in paths:
        try:
            sizes.append(header_size(path))
        except ImageError:
            sizes.append(None)
    stacked = torch.cat([features[name].float() for name in ordered if name in features])
    torch.nn.functional.normalize(stacked, dim=1, out=stacked)  # once, in place: the checks read unit rows
    signatures = torch.cat([_signatures(caches[name]) for name in ordered if name in features])
    health = check_data(
        HealthInput(
            files, list(classes), stacked, [known[ref.path] for ref in files], sizes, signatures, seed
        )
    )
    report = build_report(health, data_dir, model_name, image_size, classes)
    html = write_report(out_dir, report)
    logger.info("%s", summary_line(report, html))
    return report, html


def check_run_data(
    run_dir: Path,
    data_dir: Path,
    classes: Sequence[str],
    caches: Mapping[str, CachedImages],
    features: Mapping[str, torch.Tensor],
    model_name: str,
    image_size: int,
    seed: int = 0,
) -> str:
    """The checks at the start of a training, reusing split.json's hashes; returns the summary line."""
    from finetune.checkpoint import write_json
    from finetune.data_report import REPORT_JSON
    from finetune.split import read_split

    started = time.perf_counter()
    record = read_split(run_dir)
    digests = {f.path: f.sha256 for f in record.files} if record is not None else None
    report, html = inspect_training_data(
        data_dir, classes, caches, features, run_dir, model_name, image_size, digests, seed
    )
    report["timings_s"]["total"] = round(time.perf_counter() - started, 3)
    write_json(Path(run_dir) / REPORT_JSON, report)
    return summary_line(report, html)


def _signatures(cache: CachedImages, batch_size: int = 512) -> torch.Tensor:
    """`pixel_signatures` of every cached image, a batch of rows at a time (the cache is memory-mapped)."""
    rows = torch.arange(len(cache))
    return torch.cat([pixel_signatures(cache.pixels[index]) for index in torch.split(rows, batch_size)])


def add_top_losses(
    out_dir: Path,
    data_dir: Path,
    data: CachedImages,
    logits: torch.Tensor,
    classes: Sequence[str],
    report: dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The model's top losses and most-confused pairs on `data` (validation), added to the report on disk.

    Without a report (a run whose strategy skipped the probe, so no check ran) there is nothing to add to.
    """
    report = report or read_report(out_dir)
    if report is None:
        return None
    probabilities = torch.softmax(logits.float(), dim=1).numpy()
    paths = [relative_path(path, data_dir) for path in data.paths]
    add_training_results(report, paths, ["val"] * len(paths), data.targets.numpy(), probabilities, classes)
    write_report(out_dir, report)
    write_top_losses_png(out_dir, report)
    return report


def apply_exclusions(split: DatasetSplit, data_dir: Path, list_file: Path) -> DatasetSplit:
    """`split` without the files `list_file` names (a data_report.json or an edited data_issues.txt)."""
    excluded = read_exclusions(list_file)
    kept: dict[str, list] = {}
    found: set[str] = set()
    for name, samples in split.subsets().items():
        kept[name] = []
        for sample in samples:
            path = relative_path(sample.path, data_dir)
            if path in excluded:
                found.add(path)
            else:
                kept[name].append(sample)
    unknown = excluded - found
    if unknown:
        logger.warning(
            "%d file(s) of %s are not in the dataset any more (e.g. %s); nothing to leave out for them.",
            len(unknown), list_file, sorted(unknown)[0],
        )  # fmt: skip
    logger.info("Leaving %d flagged file(s) out of training (%s)", len(found), list_file)
    return DatasetSplit(
        classes=split.classes, train=kept["train"], val=kept["val"], has_val_folder=split.has_val_folder,
        test=kept["test"], layout=split.layout,
    )  # fmt: skip


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.inspect",
        description="Check a folder of class subfolders for duplicates, train/val leakage, likely label "
        "issues, outliers, odd sizes and class imbalance; write data_report.html/json and data_issues.txt. "
        "Nothing in DATA_DIR is moved or deleted.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("data_dir", type=Path, help="folder of class subfolders (or train/ + val/ + test/)")
    parser.add_argument(
        "--checkpoint", type=Path, metavar="RUN",
        help="a run folder: use its backbone (and its recorded split when it was trained on DATA_DIR), and "
        "add its top losses and most-confused pairs on the validation images",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("data_report"), help="report folder to write")
    parser.add_argument("--model", default=None, help="timm backbone without --checkpoint (default lite0)")
    parser.add_argument("--img-size", type=int, default=0, help="decode size; 0 = what training would use")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share per class")
    parser.add_argument(
        "--val-max-images", type=int, default=VAL_MAX_IMAGES,
        help="at most about this many validation images in all, as training splits them; 0 = no cap",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the split and of the k-fold probe")
    parser.add_argument("--workers", type=int, default=0, help="decoding threads; 0 = all cores")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where to run")
    parser.add_argument("--quiet", action="store_true", help="warnings only")
    return parser


def main(argv: list[str] | None = None) -> int:
    from finetune.cli import configure_logging, run_cli

    args = get_parser().parse_args(argv)
    configure_logging(args.quiet)
    return run_cli(lambda: _inspect(args))


def _inspect(args: argparse.Namespace) -> int:
    from finetune import checkpoint, modeling
    from finetune.distributed import init_distributed
    from finetune.engine import extract_features
    from finetune.precision import resolve_precision
    from finetune.recipe import plan_recipe
    from finetune.split import read_split

    split, record = None, None
    if args.checkpoint is not None:
        loaded = checkpoint.load_run(args.checkpoint)
        model, data_config, model_name = loaded.model, loaded.data_config, loaded.architecture
        record = read_split(loaded.run_dir) if loaded.run_dir else None
        if record is not None and record.is_dataset(args.data_dir):
            split = record.to_split()
    if split is None:
        split = scan_dataset(args.data_dir, args.val_fraction, args.seed, args.val_max_images)
    if args.checkpoint is None:
        model_name = args.model or modeling.DEFAULT_MODEL
        created = modeling.create_model_and_transforms(model_name, len(split.classes))
        native = int(created.data_config["input_size"][-1])
        size = plan_recipe(split.train, native, args.img_size).image_size
        model, data_config = created.model, modeling.resolve_model_data_config(created.model, size)
    image_size = int(data_config["input_size"][-1])
    geometric, mean, std = modeling.split_eval_transform(data_config)
    dist = init_distributed(args.device)
    precision = resolve_precision("auto", dist.device)
    model.to(dist.device).eval()
    caches: dict[str, CachedImages] = {}
    features: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory(prefix="inspect-cache-") as cache_dir:
        for name, samples in split.subsets().items():
            if not samples:
                continue
            caches[name] = build_cache(
                samples, geometric, image_size, Path(cache_dir) / f"{name}.npy", args.workers or None,
                _progress(f"decode {name}", args.quiet), modeling.draft_size_for(data_config),
            )  # fmt: skip
            features[name] = extract_features(
                model, caches[name], mean, std, precision, on_step=_progress(f"features {name}", args.quiet)
            )
        digests = {f.path: f.sha256 for f in record.files} if record is not None else None
        report, html = inspect_training_data(
            args.data_dir, split.classes, caches, features, args.out, model_name, image_size, digests,
            args.seed,
        )  # fmt: skip
        head = model.get_classifier()
        same_labels = args.checkpoint is not None and loaded.labels == split.classes
        if same_labels and isinstance(head, torch.nn.Linear) and "val" in features:
            with torch.no_grad():
                logits = head(features["val"].to(head.weight.device, head.weight.dtype)).cpu()
            report = add_top_losses(args.out, args.data_dir, caches["val"], logits, split.classes, report)
    print(summary_line(report, html))
    return 0


def _progress(title: str, quiet: bool) -> Callable[[int, int], None] | None:
    if quiet:
        return None
    from tqdm import tqdm

    bar: dict[str, Any] = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, desc=title, file=sys.stderr, leave=False)
        bar["bar"].update(done - bar["bar"].n)  # redraws at most every mininterval, not per call
        if done >= total:
            bar.pop("bar").close()

    return update


if __name__ == "__main__":
    raise SystemExit(main())
