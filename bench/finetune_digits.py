"""Benchmark: the default `python -m finetune` command on sklearn's digits, against a linear probe.

Builds the digits set (1,797 real handwritten digits upscaled to 64x64 RGB PNGs, 70/30 stratified split,
seed 0), runs the default command on the 70% part, evaluates the run on the held-out 30% with
`python -m finetune.evaluate`, and in the same run computes the linear-probe baseline (frozen embedded
tf_efficientnet_lite0 features + logistic regression). Prints top-1 of both, wall time, peak RSS and train
images/s; `--speed-224` also measures training throughput at 224 px.

    python bench/finetune_digits.py [--work DIR] [--speed-224] [-- extra finetune flags]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = {"top1": 0.990, "wall_s": 120.0, "peak_rss_gb": 2.0, "images_per_s_224": 40.0}


def build_digits(work: Path, seed: int = 0) -> tuple[Path, Path]:
    """70/30 stratified split (by `seed`) of sklearn's digits as 64x64 RGB PNGs in class folders."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    indices = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(indices, test_size=0.3, stratify=digits.target, random_state=seed)
    for split, chosen in (("train", train_idx), ("test", test_idx)):
        for index in chosen:
            folder = work / split / str(digits.target[index])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels).resize((64, 64), Image.BICUBIC).convert("RGB")
            image.save(folder / f"{index:04d}.png")
    return work / "train", work / "test"


def timed_command(command: list[str]) -> tuple[float, float, str]:
    """Run a command, return (wall seconds, peak RSS in GB of the child, stdout)."""
    wrapper = [
        sys.executable,
        "-c",
        "import resource, subprocess, sys, time; t = time.perf_counter(); "
        "p = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
        "sys.stderr.write(p.stderr[-3000:]); print(p.stdout, end=''); "
        "print('\\n__WALL__', time.perf_counter() - t); "
        "print('__RSS__', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(p.returncode)",
        *command,
    ]
    completed = subprocess.run(wrapper, capture_output=True, text=True, cwd=ROOT)
    if completed.returncode != 0:
        sys.stderr.write(completed.stderr)
        raise SystemExit(f"command failed: {' '.join(command)}")
    lines = completed.stdout.splitlines()
    wall = float(next(line.split()[1] for line in lines if line.startswith("__WALL__")))
    rss_kb = float(next(line.split()[1] for line in lines if line.startswith("__RSS__")))
    output = "\n".join(line for line in lines if not line.startswith("__"))
    return wall, rss_kb / 1024 / 1024, output


def linear_probe_baseline(train_dir: Path, test_dir: Path) -> tuple[float, float]:
    """Frozen embedded-backbone features at the default 224 px + scikit-learn logistic regression."""
    import torch
    from sklearn.linear_model import LogisticRegression

    from finetune.data import scan_dataset
    from finetune.images import open_image
    from finetune.modeling import create_eval_transform, create_model_and_transforms

    started = time.perf_counter()
    created = create_model_and_transforms(num_classes=10)
    model = created.model.eval()
    transform = create_eval_transform(created.data_config)

    def features(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        split = scan_dataset(folder, val_fraction=0.5)
        samples = split.train + split.val
        rows = []
        with torch.inference_mode():
            for start in range(0, len(samples), 64):
                batch = torch.stack([transform(open_image(s.path)) for s in samples[start : start + 64]])
                rows.append(model.forward_head(model.forward_features(batch), pre_logits=True).numpy())
        return np.concatenate(rows), np.array([split.classes[s.target] for s in samples])

    train_x, train_y = features(train_dir)
    test_x, test_y = features(test_dir)
    classifier = LogisticRegression(max_iter=2000).fit(train_x, train_y)
    return float((classifier.predict(test_x) == test_y).mean()), time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--speed-224", action="store_true", help="also measure train images/s at 224 px")
    parser.add_argument("--skip-probe", action="store_true", help="skip the linear-probe baseline")
    parser.add_argument("extra", nargs="*", help="extra flags for python -m finetune (after --)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="digits-bench-"))
    train_dir, test_dir = build_digits(work / "data")
    run_dir = work / "run"
    wall, rss_gb, _ = timed_command(
        [sys.executable, "-m", "finetune", str(train_dir), "--out", str(run_dir), "--quiet", *args.extra]
    )
    _, _, evaluation = timed_command(
        [sys.executable, "-m", "finetune.evaluate", str(test_dir), "--checkpoint", str(run_dir), "--json"]
    )
    top1 = json.loads(evaluation)["top1"]
    history = json.loads((run_dir / "metrics.json").read_text())["epochs"]
    speeds = [row["train_images_per_s"] for row in history if row.get("train_images_per_s")]
    config = json.loads((run_dir / "config.json").read_text())
    size = config["data_config"]["input_size"][-1]
    print(f"default command: held-out top-1 {top1:.4f}  wall {wall:.1f} s  peak RSS {rss_gb:.2f} GB")
    print(
        f"  strategy used {config['studio']['metrics']['strategy_used']}, {len(history) - 1} fine-tune epochs"
    )
    if speeds:
        print(f"  train speed {np.median(speeds):.1f} img/s at {size} px (median over epochs)")
    if not args.skip_probe:
        probe_top1, probe_s = linear_probe_baseline(train_dir, test_dir)
        print(
            f"linear probe (224 px features + logistic regression): top-1 {probe_top1:.4f}  {probe_s:.1f} s"
        )
    if args.speed_224:
        speed_run = work / "run224"
        timed_command(
            [sys.executable, "-m", "finetune", str(train_dir), "--out", str(speed_run), "--quiet",
             "--img-size", "224", "--strategy", "finetune", "--epochs", "2"]
        )  # fmt: skip
        rows = json.loads((speed_run / "metrics.json").read_text())["epochs"]
        speed = max(row["train_images_per_s"] for row in rows if row.get("train_images_per_s"))
        print(f"train speed at 224 px: {speed:.1f} img/s (target >= {TARGETS['images_per_s_224']:.0f})")
    print(
        f"targets: top-1 >= {TARGETS['top1']}, wall <= {TARGETS['wall_s']:.0f} s, "
        f"RSS <= {TARGETS['peak_rss_gb']} GB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
