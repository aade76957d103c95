"""Benchmark: multi-label training from a labels CSV against a frozen-feature one-vs-rest logistic regression.

Issue 16 asks the default `python -m finetune labels.csv --out RUN` to reach test mAP >= 0.95 and >= the
probe's + 5 points, within 10 minutes on 2 cores. The data are real photos: 2x2 mosaics of Fashion-MNIST
items (/usr/share/datasets/fashion-mnist, `apt-get install dataset-fashion-mnist`), each cell empty or one
item, labelled with the item classes present (so 0 to 4 labels per image). Training mosaics use items of
Fashion-MNIST's training set only, test mosaics items of its test set only: no item is seen on both sides.

Side by side, in the same run:
- default: `python -m finetune train/labels.csv --out RUN` (auto recipe), scored by
  `python -m finetune.evaluate test/labels.csv --checkpoint RUN --json`;
- probe: the embedded tf_efficientnet_lite0's frozen pooled features of the run's pixels (the whole mosaic
  at its native 224 px), scikit-learn
  `OneVsRestClassifier(LogisticRegression)`, per-label thresholds fitted (max F1) on the same validation
  images as the run's (its split.json), scored on the same test mosaics with the same metric code.

    python bench/multilabel.py [--train 3000] [--test 1000] [--losses bce,asl] [--work DIR] [-- flags]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from finetune_digits import timed_command  # noqa: E402

FASHION = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
EMPTY_CELL = 0.35  # chance that a mosaic cell holds no item


def _idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def build_mosaics(folder: Path, images: np.ndarray, targets: np.ndarray, count: int, seed: int) -> Path:
    """`count` 56 px mosaics of distinct source items, with folder/labels.csv; returns the CSV's path."""
    rng = np.random.default_rng(seed)
    order = iter(rng.permutation(len(images)))  # each source item is used at most once
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        canvas = np.zeros((56, 56), np.uint8)
        present = set()
        for cell in range(4):
            if rng.random() < EMPTY_CELL:
                continue
            item = next(order)
            row, column = divmod(cell, 2)
            canvas[row * 28 : row * 28 + 28, column * 28 : column * 28 + 28] = images[item]
            present.add(int(targets[item]))
        name = f"images/{n:05d}.png"
        Image.fromarray(canvas).convert("RGB").save(folder / name)
        rows.append((name, " ".join(CLASSES[c] for c in sorted(present))))
    csv_path = folder / "labels.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    return csv_path


def probe_baseline(run_dir: Path, test_csv: Path) -> tuple[dict[str, float], float]:
    """Frozen lite0 features of the run's pixels + one-vs-rest logistic regression; thresholds on its val."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    from finetune import multilabel
    from finetune.checkpoint import read_run_config
    from finetune.images import open_image
    from finetune.labels_csv import make_samples, multi_hot, read_csv_split, read_labels_csv
    from finetune.modeling import create_eval_transform, create_model_and_transforms

    started = time.perf_counter()
    created = create_model_and_transforms(num_classes=len(CLASSES))
    run_data_config = read_run_config(run_dir)["data_config"]  # the run's pixels (whole mosaics)
    model, transform = created.model.eval(), create_eval_transform(run_data_config)
    record = read_csv_split(run_dir)
    labels = record.split.classes
    test_labels, entries = read_labels_csv(test_csv, known_labels=labels)
    test = make_samples(entries, test_labels)
    subsets = {"train": record.split.train, "val": record.split.val, "test": test}

    def features(samples: list) -> tuple[np.ndarray, np.ndarray]:
        rows = []
        with torch.inference_mode():
            for start in range(0, len(samples), 64):
                batch = torch.stack([transform(open_image(s.path)) for s in samples[start : start + 64]])
                rows.append(model.forward_head(model.forward_features(batch), pre_logits=True).numpy())
        return np.concatenate(rows), multi_hot([s.labels for s in samples], len(labels)).numpy()

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (features(subsets[s]) for s in subsets)
    classifier = OneVsRestClassifier(LogisticRegression(max_iter=2000)).fit(train_x, train_y)
    thresholds = multilabel.fit_thresholds(val_y, classifier.predict_proba(val_x))
    report = multilabel.multilabel_report(test_y, classifier.predict_proba(test_x), thresholds, labels)
    return multilabel.summary(report), time.perf_counter() - started


def main() -> int:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--train", type=int, default=3000, help="training mosaics (default 3000)")
    parser.add_argument("--test", type=int, default=1000, help="test mosaics (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--losses", default="bce", help="multi-label losses to train, e.g. bce,asl")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("extra", nargs="*", help="extra flags for python -m finetune (after --)")
    args = parser.parse_args()
    if not (FASHION / "train-images-idx3-ubyte.gz").exists():
        raise SystemExit(f"needs Fashion-MNIST in {FASHION}: apt-get install -y dataset-fashion-mnist")
    work = args.work or Path(tempfile.mkdtemp(prefix="multilabel-bench-"))
    train_csv = build_mosaics(
        work / "train", _idx(FASHION / "train-images-idx3-ubyte.gz"),
        _idx(FASHION / "train-labels-idx1-ubyte.gz"), args.train, args.seed,
    )  # fmt: skip
    test_csv = build_mosaics(
        work / "test", _idx(FASHION / "t10k-images-idx3-ubyte.gz"),
        _idx(FASHION / "t10k-labels-idx1-ubyte.gz"), args.test, args.seed + 1,
    )  # fmt: skip
    results = {}
    for loss in args.losses.split(","):  # the default is bce; "bce,asl" measures both in one run
        run_dir = work / f"run_{loss}"
        extra = [] if loss == "bce" else ["--multilabel-loss", loss]
        train_s, rss_gb, summary = timed_command(
            [sys.executable, "-m", "finetune", str(train_csv), "--out", str(run_dir), "--quiet", *extra,
             *args.extra]
        )  # fmt: skip
        print(f"[{loss}] {summary.strip()}")
        _, _, output = timed_command(
            [sys.executable, "-m", "finetune.evaluate", str(test_csv), "--checkpoint", str(run_dir), "--json",
             "--runtime", "torch"]
        )  # fmt: skip
        studio = json.loads((run_dir / "config.json").read_text())["studio"]
        results[loss] = (json.loads(output.strip().splitlines()[-1]), train_s, rss_gb, studio)
    probe, probe_s = probe_baseline(run_dir, test_csv)  # every run has the same split (same seed)
    print(
        f"\nFashion-MNIST 2x2 mosaics: {args.train} train / {args.test} test (disjoint items), "
        f"{len(CLASSES)} labels"
    )
    print(f"{'method':<14} {'test mAP':>9} {'micro F1':>9} {'macro F1':>9} {'wall s':>8}  notes")
    for loss, (scores, train_s, rss_gb, studio) in results.items():
        notes = (
            f"{studio['dataset']['image_size']} px, {studio['metrics']['strategy_used']}, "
            f"{studio['metrics']['epochs_run']} epochs, peak RSS {rss_gb:.2f} GB"
        )
        print(f"{'default/' + loss:<14} {scores['mAP']:9.4f} {scores['micro_f1']:9.4f} "
              f"{scores['macro_f1']:9.4f} {train_s:8.0f}  {notes}")  # fmt: skip
    print(f"{'probe (LR)':<14} {probe['mAP']:9.4f} {probe['micro_f1']:9.4f} {probe['macro_f1']:9.4f} "
          f"{probe_s:8.0f}  lite0 224 px frozen features")  # fmt: skip
    scores, train_s = results[next(iter(results))][:2]
    margin = 100 * (scores["mAP"] - probe["mAP"])
    print(f"{next(iter(results))} - probe: {margin:+.1f} mAP points")
    ok = scores["mAP"] >= 0.95 and margin >= 5 and train_s <= 600
    print("target (mAP >= 0.95, >= probe + 5 points, <= 600 s):", "met" if ok else "NOT met")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
