"""Benchmark: calibrated confidence and "none of these" for the default command on sklearn's digits.

Trains the default `python -m finetune` on 70% of the digits (`bench/finetune_digits.py`'s `build_digits`),
then on the held-out 30%: ECE (15 bins) and NLL before/after the stored temperature, top-1 on all and on
accepted images. Then scores out-of-distribution images that ship on this machine (crops of scikit-image
photos, Fashion-MNIST test images from the Debian package `dataset-fashion-mnist`, uniform noise) against
the held-out digits and prints AUROC and FPR@95 (share of OOD images accepted when 95% of held-out digits
are) for every candidate score of `finetune.ood`, plus the rejection rate of the stored rule.

    python bench/trust.py [--work DIR] [--run RUN_DIR] [--n-ood 400]
"""

from __future__ import annotations

import argparse
import gzip
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

TARGETS = {"ece_after": 0.02, "auroc": 0.98, "fpr95": 0.10}  # AUROC/FPR vs photo crops and Fashion-MNIST
FASHION = Path("/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz")
PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "moon", "coins", "page", "brick", "grass",
          "gravel", "hubble_deep_field", "immunohistochemistry", "text", "clock", "horse")  # fmt: skip


def photo_crops(count: int, seed: int = 0) -> list[Image.Image]:
    """Random square crops (32-256 px) of scikit-image's photos."""
    from skimage import data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        array = np.asarray(getattr(data, name)())
        if array.dtype == bool:
            array = array.astype(np.uint8) * 255
        photos.append(Image.fromarray(array.astype(np.uint8)).convert("RGB"))
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = int(rng.integers(32, min(256, *photo.size) + 1))
        left = int(rng.integers(0, photo.width - side + 1))
        top = int(rng.integers(0, photo.height - side + 1))
        crops.append(photo.crop((left, top, left + side, top + side)))
    return crops


def fashion_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Fashion-MNIST test images (28x28 grey), upscaled to 64x64 RGB like the digits."""
    with gzip.open(FASHION, "rb") as stream:
        raw = np.frombuffer(stream.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    chosen = np.random.default_rng(seed).choice(len(raw), size=count, replace=False)
    return [Image.fromarray(raw[i]).resize((64, 64), Image.BICUBIC).convert("RGB") for i in chosen]


def noise_images(count: int, seed: int = 0) -> list[Image.Image]:
    """Uniform RGB noise, 64x64."""
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) for _ in range(count)]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--run", type=Path, help="reuse this trained digits run (with --work's data)")
    parser.add_argument("--n-ood", type=int, default=400, help="images per OOD set")
    args = parser.parse_args()

    from finetune_digits import build_digits, timed_command

    from finetune import ood
    from finetune.calibration import calibration_figures
    from finetune.checkpoint import load_run
    from finetune.evaluate import labelled_files
    from finetune.images import open_image
    from finetune.runtime import create_classifier
    from finetune.split import read_split

    work = args.work or Path(tempfile.mkdtemp(prefix="trust-bench-"))
    if not (work / "data" / "test").is_dir():
        build_digits(work / "data")
    run_dir = args.run or work / "run"
    if not (run_dir / "config.json").is_file():
        wall, _, _ = timed_command(
            [sys.executable, "-m", "finetune", str(work / "data" / "train"), "--out", str(run_dir), "--quiet"]
        )
        print(f"trained the default command in {wall:.0f} s")
    run = load_run(run_dir)
    classifier = create_classifier(run, "torch")

    def outputs(images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        return classifier.predict_outputs(classifier.preprocess(images))

    test = labelled_files(work / "data" / "test", run.labels)
    test_targets = np.array([target for _, target in test])
    test_logits, test_features = outputs([open_image(path) for path, _ in test])
    record = read_split(run_dir)
    train = record.samples("train")
    val = record.samples("val")
    train_logits, train_features = outputs([open_image(s.path) for s in train])
    val_logits, val_features = outputs([open_image(s.path) for s in val])
    train_targets = np.array([s.target for s in train])

    stored = classifier.trust
    if not stored.is_calibrated:  # a run trained before calibration: fit exactly as training now does
        from finetune.trust import read_trust
        from finetune.trust_fit import fit_trust

        val_targets = np.array([s.target for s in val])
        sections = fit_trust(
            val_logits, val_targets, val_features, train_features, train_targets, len(run.labels)
        )
        stored = read_trust({"studio": sections})
        print("the run stores no calibration: fitted on its validation split as training does")
    temperature = stored.temperature
    figures = calibration_figures(test_logits, test_targets, temperature)
    top1 = float((test_logits.argmax(1) == test_targets).mean())
    print(
        f"\nheld-out digits: {len(test_targets)} images, top-1 {top1:.4f}, "
        f"stored temperature {temperature:.3f}"
    )
    print(
        f"  ECE {figures['ece_before']:.2%} -> {figures['ece_after']:.2%} "
        f"(target <= {TARGETS['ece_after']:.0%}),"
        f"  NLL {figures['nll_before']:.4f} -> {figures['nll_after']:.4f}"
    )

    started = time.perf_counter()
    sets = {
        "photo crops": outputs(photo_crops(args.n_ood)),
        "fashion-mnist": outputs(fashion_images(args.n_ood)),
        "uniform noise": outputs(noise_images(args.n_ood)),
    }
    means = ood.class_means(train_features, train_targets, len(run.labels))
    mahalanobis = ood.Mahalanobis.fit(train_features, train_targets, len(run.labels))

    def candidates(logits: np.ndarray, features: np.ndarray) -> dict[str, np.ndarray]:
        scores = ood.logit_scores(logits)
        scores["cosine"] = ood.cosine_score(features, means)
        scores["mahalanobis"] = mahalanobis.score(features)
        return scores

    in_scores = candidates(test_logits, test_features)
    print(f"\nOOD scores ({args.n_ood} images per set, {time.perf_counter() - started:.0f} s to compute):")
    print(f"  {'score':<12}" + "".join(f"{name:>28}" for name in sets))
    print(f"  {'':<12}" + "".join(f"{'AUROC   FPR@95':>28}" for _ in sets))
    for method in ood.METHODS:
        cells = []
        for logits, features in sets.values():
            out = candidates(logits, features)[method]
            cells.append(
                f"{ood.auroc(in_scores[method], out):.4f}  {ood.fpr_at_tpr(in_scores[method], out):7.2%}"
            )
        marker = "  <- stored" if stored.rejector and stored.rejector.method == method else ""
        print(f"  {method:<12}" + "".join(f"{cell:>28}" for cell in cells) + marker)
    print(
        f"  targets vs photo crops and Fashion-MNIST: AUROC >= {TARGETS['auroc']}, "
        f"FPR@95 <= {TARGETS['fpr95']:.0%}"
    )

    if stored.rejector is not None:
        rule = stored.rejector
        accepted = rule.score(test_logits, test_features) <= rule.threshold
        accepted_top1 = float((test_logits.argmax(1)[accepted] == test_targets[accepted]).mean())
        print(
            f"\nstored rule: {rule.method} <= {rule.threshold:.4f} "
            f"(accepts {rule.accept_rate:.0%} of validation)"
            f"\n  held-out digits accepted {accepted.mean():.2%}, top-1 on accepted {accepted_top1:.4f}"
            f" (all: {top1:.4f})"
        )
        for name, (logits, features) in sets.items():
            rejected = (rule.score(logits, features) > rule.threshold).mean()
            print(f"  {name}: {rejected:.2%} rejected as 'not one of the {len(run.labels)} classes'")
    else:
        val_scores = candidates(val_logits, val_features)
        for method in ood.METHODS:
            threshold = ood.threshold_for(val_scores[method], ood.DEFAULT_ACCEPT_RATE)
            print(
                f"  (no stored rule) {method}: "
                f"held-out accepted {(in_scores[method] <= threshold).mean():.2%}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
