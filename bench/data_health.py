"""Benchmark: do the data checks find planted problems, and what do they add to a training's wall time?

Builds sklearn's digits (64x64 RGB PNGs, 70/30 stratified split as train/ and val/, seed 0), then plants:
5% of the training images moved to a wrong class (flipped labels), 20 training images copied into another
class (conflicts, exact copies), 20 training images copied into val/ (leakage: 8 byte-identical, 6 resized,
6 re-encoded as JPEG) and 10 scikit-image photo crops filed under random classes (outliers). Runs the
default `python -m finetune` command (the checks run at its start, from the probe's features) and prints
precision and recall of each check against what was planted, and the checks' share of the wall time.

    python bench/data_health.py [--work DIR] [--inspect-only] [--fashion-mnist [N]]

`--inspect-only` runs `python -m finetune.inspect` instead of a training (no wall-time ratio).
`--fashion-mnist` reports on the Fashion-MNIST training images (/usr/share/datasets/fashion-mnist).
"""

from __future__ import annotations

import argparse
import gzip
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"label_recall": 0.80, "label_precision": 0.70, "near_recall": 0.90, "outliers_found": 8}
FASHION = Path("/usr/share/datasets/fashion-mnist")


def build(work: Path, seed: int = 0) -> dict[str, set]:
    """The planted dataset under `work/digits`; returns the planted paths (relative) per problem."""
    from skimage import data as skdata
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    rng = np.random.default_rng(seed)
    digits = load_digits()
    root = work / "digits"
    indices = np.arange(len(digits.target))
    train_idx, val_idx = train_test_split(indices, test_size=0.3, stratify=digits.target, random_state=seed)

    def image(index: int) -> Image.Image:
        pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
        return Image.fromarray(pixels).resize((64, 64), Image.BICUBIC).convert("RGB")

    def other(label: int) -> int:
        return int(rng.choice([c for c in range(10) if c != label]))

    planted: dict[str, set] = {"flipped": set(), "conflict": set(), "exact_leak": set(), "near_leak": set()}
    planted["outlier"] = set()
    order = rng.permutation(train_idx)
    flipped = set(order[: round(0.05 * len(train_idx))].tolist())
    for index in train_idx:
        label = int(digits.target[index])
        if index in flipped:
            label = other(label)
        path = root / "train" / str(label) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image(index).save(path)
        if index in flipped:
            planted["flipped"].add(path.relative_to(root).as_posix())
    for index in val_idx:
        path = root / "val" / str(digits.target[index]) / f"{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image(index).save(path)
    clean = [i for i in order[len(flipped) :].tolist()]
    for index in clean[:20]:  # conflicts: the same bytes under another class
        label = int(digits.target[index])
        target = root / "train" / str(other(label)) / f"copy_{index:04d}.png"
        shutil.copyfile(root / "train" / str(label) / f"{index:04d}.png", target)
        planted["conflict"].add(
            frozenset({target.relative_to(root).as_posix(), f"train/{label}/{index:04d}.png"})
        )
    for n, index in enumerate(clean[20:40]):  # leakage: a training image in val/
        label = int(digits.target[index])
        source = root / "train" / str(label) / f"{index:04d}.png"
        if n < 8:
            target = root / "val" / str(label) / f"leak_{index:04d}.png"
            shutil.copyfile(source, target)
            kind = "exact_leak"
        elif n < 14:
            target = root / "val" / str(label) / f"leak_{index:04d}.png"
            Image.open(source).resize((58, 58), Image.BILINEAR).save(target)
            kind = "near_leak"
        else:
            target = root / "val" / str(label) / f"leak_{index:04d}.jpg"
            Image.open(source).save(target, quality=75)
            kind = "near_leak"
        planted[kind].add(
            frozenset({target.relative_to(root).as_posix(), source.relative_to(root).as_posix()})
        )
    photos = ["astronaut", "chelsea", "coffee", "rocket", "camera", "coins", "moon", "page", "brick", "grass"]
    for n, name in enumerate(photos):  # outliers: photo crops filed as digits
        photo = np.asarray(getattr(skdata, name)())
        photo = np.stack([photo] * 3, axis=-1) if photo.ndim == 2 else photo[..., :3]
        side = min(photo.shape[:2]) // 2
        top, left = rng.integers(0, photo.shape[0] - side), rng.integers(0, photo.shape[1] - side)
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((64, 64), Image.BICUBIC)
        target = root / "train" / str(int(rng.integers(0, 10))) / f"photo_{n:02d}.png"
        crop.save(target)
        planted["outlier"].add(target.relative_to(root).as_posix())
    return planted


def score(report: dict, planted: dict[str, set]) -> dict[str, float]:
    """Precision and recall of each check against the planted problems; prints a table."""
    findings = report["findings"]

    def pairs(check: str) -> set:
        return {frozenset(f["path"] for f in x["files"]) for x in findings if x["check"] == check}

    flagged_labels = {x["files"][0]["path"] for x in findings if x["check"] == "label_issue"}
    wrong = planted["flipped"] | planted["outlier"] | {p for pair in planted["conflict"] for p in pair}
    exact_planted = planted["conflict"] | planted["exact_leak"]
    exact_found = pairs("exact_duplicate")
    near_found = pairs("near_duplicate")
    outliers = {x["files"][0]["path"] for x in findings if x["check"] == "outlier"}
    rows = {
        "label_recall": len(flagged_labels & planted["flipped"]) / len(planted["flipped"]),
        "label_precision_strict": len(flagged_labels & planted["flipped"]) / max(len(flagged_labels), 1),
        "label_precision": len(flagged_labels & wrong) / max(len(flagged_labels), 1),
        "exact_recall": len(exact_planted & exact_found) / len(exact_planted),
        "exact_precision": len(exact_planted & exact_found) / max(len(exact_found), 1),
        "near_recall": len(planted["near_leak"] & near_found) / len(planted["near_leak"]),
        "near_precision": len(planted["near_leak"] & near_found) / max(len(near_found), 1),
        "outliers_found": len(outliers & planted["outlier"]),
        "outlier_precision": len(outliers & planted["outlier"]) / max(len(outliers), 1),
    }
    kinds = {x["kind"] for x in findings if x["check"] == "exact_duplicate" and frozenset(
        f["path"] for f in x["files"]) in planted["conflict"]}  # fmt: skip
    print(f"flagged: {report['counts']}; planted conflicts reported as {sorted(kinds)}")
    print(f"{'check':<24}{'value':>8}  target")
    for name, value in rows.items():
        target = TARGETS.get(name, "")
        shown = f"{value:8.3f}" if isinstance(value, float) else f"{value:8d}"
        print(f"{name:<24}{shown}  {target}")
    print("(label_precision counts every planted wrong label: flips, conflict copies and photo outliers; "
          "label_precision_strict only the flips)")  # fmt: skip
    return rows


def run(command: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=sys.stdout, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def fashion_mnist(work: Path, limit: int) -> None:
    """Fashion-MNIST's training images as PNG class folders, then `python -m finetune.inspect` on them."""
    with gzip.open(FASHION / "train-images-idx3-ubyte.gz") as handle:
        images = np.frombuffer(handle.read(), dtype=np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION / "train-labels-idx1-ubyte.gz") as handle:
        labels = np.frombuffer(handle.read(), dtype=np.uint8, offset=8)
    names = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
    root = work / "fashion"
    for index in range(min(limit, len(images))):
        folder = root / names[labels[index]]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(images[index]).save(folder / f"{index:05d}.png")
    wall = run([sys.executable, "-m", "finetune.inspect", str(root), "--out", str(work / "fashion_report"),
                "--quiet"])  # fmt: skip
    report = json.loads((work / "fashion_report" / "data_report.json").read_text())
    print(f"Fashion-MNIST {report['num_files']} images: wall {wall:.0f} s; checks {report['timings_s']}")
    print(f"counts {report['counts']}; kinds {report['kinds']}")
    for check in ("label_issue", "near_duplicate", "exact_duplicate", "outlier"):
        top = [x for x in report["findings"] if x["check"] == check][:3]
        for x in top:
            print(f"  {check}: {[f['path'] for f in x['files']]} -> {x['suggested_class']} ({x['score']})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="work folder (default: a temporary one)")
    parser.add_argument("--inspect-only", action="store_true", help="python -m finetune.inspect, no training")
    parser.add_argument("--fashion-mnist", type=int, nargs="?", const=60000, default=0, metavar="N",
                        help="also report on the first N Fashion-MNIST training images")  # fmt: skip
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="data-health-"))
    shutil.rmtree(work / "digits", ignore_errors=True)
    planted = build(work)
    out = work / "run"
    shutil.rmtree(out, ignore_errors=True)
    if args.inspect_only:
        wall = run(
            [sys.executable, "-m", "finetune.inspect", str(work / "digits"), "--out", str(out), "--quiet"]
        )
    else:
        wall = run([sys.executable, "-m", "finetune", str(work / "digits"), "--out", str(out), "--quiet"])
    report = json.loads((out / "data_report.json").read_text())
    score(report, planted)
    checks_s = report["timings_s"].get("total", sum(report["timings_s"].values()))
    print(f"wall {wall:.1f} s; checks {checks_s:.1f} s ({report['timings_s']})")
    if not args.inspect_only:
        print(
            f"checks add {checks_s / max(wall - checks_s, 1e-9):.1%} to the command's wall time "
            "(target <= 15%)"
        )
    if args.fashion_mnist:
        fashion_mnist(work, args.fashion_mnist)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
