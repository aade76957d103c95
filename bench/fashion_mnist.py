"""Benchmark: the default command on the 60,000 Fashion-MNIST training images, scored on the official 10,000.

Issue 19's public benchmark, on data that ships with this machine (Debian's `dataset-fashion-mnist`). One run:

1. converts the Debian files to class folders once (`train/` 60,000 and `test/` 10,000 PNGs);
2. runs the default command, `python -m finetune DATA --out RUN --time-budget-s BUDGET` (validation split
   out of train/, test/ scored once at the end by the kept model); prints official-test top-1, wall time,
   peak RSS, train img/s and the size of the decoded cache;
3. in the same run, the linear probe (`--strategy linear`, same resolution): the baseline to beat;
4. `--img-size 224 --time-budget-s 300`: the same peak-RSS figure where the whole decoded set would need
   ~10 GB (the RAM cliff: memory must not grow with the dataset);
5. `finetune.predict` over the 10,000 test files with 1 and 2 processes (torchrun): img/s, same CSV.

Published test top-1: SVC 89.7%, small CNNs ~93-94%, ResNet-18 94.9%, wide ResNets ~96% (GPU, hours).

    python bench/fashion_mnist.py [--work DIR] [--budget-s 1200] [--skip probe,224,predict]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fashion_data  # noqa: E402
from finetune_digits import timed_command  # noqa: E402
from predict_speed import processes  # noqa: E402

TARGETS = {"top1": 0.935, "peak_rss_gb": 3.0}
PUBLISHED = "SVC 89.7%, small CNNs ~93-94%, ResNet-18 94.9%, wide ResNets ~96%"


def train_and_report(name: str, data: Path, run: Path, flags: list[str]) -> dict[str, float]:
    """One `python -m finetune` child: its official-test top-1 (test/ scored by the kept model) and costs."""
    command = [sys.executable, "-m", "finetune", str(data), "--out", str(run), "--quiet", *flags]
    wall, rss_gb, _ = timed_command(command)
    studio = json.loads((run / "config.json").read_text())["studio"]
    metrics = studio["metrics"]
    history = json.loads((run / "metrics.json").read_text())["epochs"]
    speeds = [row["train_images_per_s"] for row in history if row.get("train_images_per_s")]
    cache_gb = sum(p.stat().st_size for p in (run / ".cache").glob("*.npy")) / 2**30
    updates = max((row.get("updates", 0) for row in history), default=0)
    print(
        f"{name:<28} test top-1 {metrics['test_top1']:.4f}  val top-1 {metrics['val_top1']:.4f}  "
        f"wall {wall:6.0f} s  peak RSS {rss_gb:.2f} GB  cache {cache_gb:.2f} GB"
    )
    print(
        f"{'':<28} {studio['dataset']['image_size']} px, {metrics['strategy_used']}, {updates} updates"
        + (f", train {statistics.median(speeds):.0f} img/s" if speeds else "")
        + f"; plan: {studio['plan']['reason']}"
    )
    return {"top1": metrics["test_top1"], "wall_s": wall, "rss_gb": rss_gb}


def predict_speed(test_dir: Path, run: Path, work: Path) -> None:
    """img/s of `finetune.predict` over the test files with 1 and 2 processes (torchrun), same CSV."""
    files = sorted(test_dir.rglob("*.png"))
    print(f"predict over the {len(files)} test files, start-up included:")
    processes(files, work, str(run), "auto", 32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/fashion-mnist-bench"), help="working folder")
    parser.add_argument("--budget-s", type=float, default=1200.0, help="--time-budget-s of the default run")
    parser.add_argument("--default-run", type=Path, help="reuse this default run instead of training one")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: probe, 224, predict")
    args = parser.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    fashion_data.require()
    data = args.work / "data"
    for split in ("train", "test"):
        fashion_data.write_class_folders(data / split, split)
    runs = args.work / time.strftime("runs-%Y%m%d-%H%M%S")
    runs.mkdir(parents=True, exist_ok=True)
    print(
        f"Fashion-MNIST: 60,000 train (validation split out of them) / 10,000 official test; "
        f"{os.cpu_count()} CPU cores; published: {PUBLISHED}"
    )
    if args.default_run:  # a default run made before (its figures are printed again, not re-measured)
        default_run = args.default_run
        default = {
            "top1": json.loads((default_run / "config.json").read_text())["studio"]["metrics"]["test_top1"]
        }
        print(f"default command (earlier run {default_run}): test top-1 {default['top1']:.4f}")
    else:
        default_run = runs / "default"
        default = train_and_report(
            "default command", data, default_run, ["--time-budget-s", str(args.budget_s)]
        )
    if "probe" not in skip:
        size = json.loads((default_run / "config.json").read_text())["studio"]["dataset"]["image_size"]
        probe = train_and_report(
            "linear probe", data, runs / "probe", ["--strategy", "linear", "--img-size", str(size)]
        )
        print(f"default - probe: {100 * (default['top1'] - probe['top1']):+.1f} points")
    if "224" not in skip:
        train_and_report(
            "224 px, 300 s budget", data, runs / "at224", ["--img-size", "224", "--time-budget-s", "300"]
        )
    if "predict" not in skip:
        predict_speed(data / "test", default_run, runs)
    print(
        f"targets: test top-1 >= {TARGETS['top1']} within {args.budget_s:.0f} s, above the probe; "
        f"peak RSS <= {TARGETS['peak_rss_gb']} GB (default and 224 px)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
