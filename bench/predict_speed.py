"""Benchmark: `finetune.predict`'s chunked path against the old one-file-at-a-time loop, and 1 vs 2 processes.

Writes the Fashion-MNIST test images (Debian's `dataset-fashion-mnist`, the official 10,000, 28x28 grayscale)
as PNGs in class folders once, then on the first `--limit` of them (all by default):

1. in one process, on one loaded classifier: the old loop (open one file, classify it alone; a tiny copy
   of the code `finetune.predict` had) against `finetune.predict.predict_rows` (chunks opened on all cores,
   the next chunk decoded while this one is classified); img/s of both and whether every label agrees;
2. `python -m finetune.predict` against `torchrun --nproc_per_node=2 -m finetune.predict`: wall time and
   img/s including start-up, and whether the two CSVs are identical.

    python bench/predict_speed.py [--limit N] [--checkpoint RUN_DIR] [--runtime auto|onnx|torch]
    python bench/predict_speed.py --large-pngs 300     # decode-bound: 1600x1200 lossless photos instead
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fashion_data  # noqa: E402

from finetune.errors import ImageError  # noqa: E402

TARGET_SPEEDUP = 1.6


def write_test_folder(work: Path) -> list[Path]:
    """The 10,000 official test images as `work/<class>/<index>.png`, written once; sorted paths."""
    return fashion_data.write_class_folders(work, "test")


def write_large_pngs(work: Path, count: int) -> list[Path]:
    """`count` lossless 1600x1200 photos (scikit-image's, cropped and resized): decoding dominates here,
    as with microscope slides or camera-trap PNG/TIFF exports, unlike Fashion-MNIST's 28 px images."""
    from skimage import data

    folder = work / "large-png"
    folder.mkdir(parents=True, exist_ok=True)
    names = ("chelsea", "coffee", "astronaut", "rocket")
    for index in range(count):
        path = folder / f"{index:04d}.png"
        if not path.exists():
            photo = Image.fromarray(getattr(data, names[index % len(names)])())
            side = min(photo.size) - (index % 50)
            photo.crop((index % 40, 0, index % 40 + side, side)).resize((1600, 1200)).save(path)
    return sorted(folder.glob("*.png"))[:count]


def old_loop(classifier, files: list[Path], batch_size: int) -> list[str]:  # noqa: ANN001
    """The loop `finetune.predict` ran before (kept as the baseline): files opened one at a time, in the
    calling thread, then each batch classified."""
    labels = []
    for start in range(0, len(files), batch_size):
        images = []
        for path in files[start : start + batch_size]:
            try:
                images.append(classifier.open(path))
            except ImageError:
                continue
        probs = classifier.predict_probs(images)
        labels.extend(classifier.labels[int(row.argmax())] for row in probs)
    return labels


def in_process(files: list[Path], checkpoint: str | None, runtime: str, batch_size: int) -> None:
    from finetune.checkpoint import load_checkpoint_or_default
    from finetune.predict import predict_rows
    from finetune.runtime import create_classifier

    classifier = create_classifier(load_checkpoint_or_default(checkpoint), runtime, batch_size=batch_size)
    old_loop(classifier, files[: 2 * batch_size], batch_size)  # warm up (first-call allocations)
    started = time.perf_counter()
    old = old_loop(classifier, files, batch_size)
    old_s = time.perf_counter() - started
    started = time.perf_counter()
    new = [row["label"] for rows in predict_rows(classifier, files, 1, batch_size) for row in rows]
    new_s = time.perf_counter() - started
    same = sum(a == b for a, b in zip(old, new, strict=True))
    print(f"runtime {classifier.runtime}, {len(files)} files, batch {batch_size}, {os.cpu_count()} cores")
    print(f"  old loop           : {len(files) / old_s:8.1f} img/s ({old_s:.1f} s)")
    print(f"  chunked path       : {len(files) / new_s:8.1f} img/s ({new_s:.1f} s)")
    print(f"  speed-up           : {old_s / new_s:8.2f}x (target >= {TARGET_SPEEDUP}x)")
    print(f"  same labels        : {same}/{len(files)}")


def processes(files: list[Path], work: Path, checkpoint: str | None, runtime: str, batch_size: int) -> None:
    args = ["--runtime", runtime, "--batch-size", str(batch_size), "--top-k", "1", "--quiet"]
    if checkpoint:
        args += ["--checkpoint", checkpoint]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    launchers = {
        1: [sys.executable, "-m", "finetune.predict"],
        2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
            "-m", "finetune.predict"],
    }  # fmt: skip
    outputs = {}
    for count, launcher in launchers.items():
        out = work / f"predict_{count}proc.csv"
        started = time.perf_counter()
        subprocess.run([*launcher, *map(str, files), *args, "--out", str(out)], check=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - started
        outputs[count] = out.read_bytes()
        rate = len(files) / seconds
        print(f"  {count} process(es)       : {rate:8.1f} img/s ({seconds:.1f} s, start-up included)")
    print(f"  same CSV            : {outputs[1] == outputs[2]}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/fashion-mnist-test"), help="PNG folder")
    parser.add_argument("--limit", type=int, default=10_000, help="how many test files to classify")
    parser.add_argument("--checkpoint", help="run folder (default: the embedded ImageNet model)")
    parser.add_argument("--runtime", default="auto", help="auto, onnx or torch (default: auto)")
    parser.add_argument("--batch-size", type=int, default=32, help="files per chunk (default: 32)")
    parser.add_argument("--skip-processes", action="store_true", help="only the in-process comparison")
    parser.add_argument(
        "--large-pngs", type=int, default=0, help="classify N large PNG photos instead (decode-bound)"
    )
    args = parser.parse_args(argv)
    if args.large_pngs:
        files = write_large_pngs(args.work, args.large_pngs)
    else:
        files = write_test_folder(args.work)[: args.limit]
    in_process(files, args.checkpoint, args.runtime, args.batch_size)
    if not args.skip_processes:
        processes(files, args.work, args.checkpoint, args.runtime, args.batch_size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
