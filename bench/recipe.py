"""Benchmark: the default recipe against a linear probe and a plain fine-tuning loop, on several data kinds.

Issue 20 asks the default `python -m finetune DATA --out RUN` to beat both baselines on data unlike digits.
One run builds each set as class folders (train/ and a held-out test/), then, side by side:

- default: `python -m finetune TRAIN --out RUN`, scored by `python -m finetune.evaluate TEST`;
- probe: frozen tf_efficientnet_lite0 features at 224 px + scikit-learn logistic regression;
- plain: a ~60-line loop, full fine-tune at 128 px, AdamW, warmup + cosine, mild affine augmentation,
  6 epochs.

Sets: sklearn digits (70/30 stratified, one split per seed), textures (32 px crops of six scikit-image photos,
one class per photo, train crops from the top half and test crops from the bottom half), faces (scikit-image's
25 px LFW faces against non-faces, 70/30), and few-shot Fashion-MNIST (10 training images per class from
/usr/share/datasets/fashion-mnist, `apt-get install dataset-fashion-mnist`; else digits with 10 per class).
Each method runs in a child process; top-1 on test/, wall time and the child's peak RSS are printed.

    python bench/recipe.py [--only digits,faces] [--seeds 0,1,2] [--all-seeds] [--shots 10]
        [--methods default,probe,plain] [-- flags]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import fashion_data  # noqa: E402
from finetune_digits import build_digits, linear_probe_baseline, timed_command  # noqa: E402

TEXTURES = ("brick", "grass", "gravel", "moon", "coins", "cell")
METHODS = ("default", "probe", "plain")


def _save(image: np.ndarray, folder: Path, name: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).convert("RGB").save(folder / f"{name}.png")


def build_textures(work: Path, seed: int, size: int = 32, train_n: int = 40, test_n: int = 20) -> None:
    """Random crops per photo; train from the top half, test from the bottom half (disjoint regions)."""
    import skimage.data

    rng = np.random.default_rng(seed)
    for name in TEXTURES:
        photo = getattr(skimage.data, name)()
        photo = photo if photo.ndim == 2 else photo[..., :3]
        half = photo.shape[0] // 2
        for split, (top, bottom), count in (
            ("train", (0, half), train_n),
            ("test", (half, photo.shape[0]), test_n),
        ):
            for i in range(count):
                y = int(rng.integers(top, bottom - size))
                x = int(rng.integers(0, photo.shape[1] - size))
                _save(photo[y : y + size, x : x + size], work / split / name, f"{i:03d}")


def build_faces(work: Path, seed: int) -> None:
    """scikit-image's LFW subset: 100 faces and 100 non-faces, 25x25 grayscale, 70/30 stratified."""
    import skimage.data
    from sklearn.model_selection import train_test_split

    images = skimage.data.lfw_subset()
    labels = np.array(["face"] * 100 + ["other"] * 100)
    indices = np.arange(len(images))
    train_idx, test_idx = train_test_split(indices, test_size=0.3, stratify=labels, random_state=seed)
    for split, chosen in (("train", train_idx), ("test", test_idx)):
        for index in chosen:
            pixels = (np.clip(images[index], 0, 1) * 255).astype(np.uint8)
            _save(pixels, work / split / labels[index], f"{index:03d}")


def build_fewshot(work: Path, seed: int, shots: int = 10, test_per_class: int = 50) -> str:
    """`shots` training images per class (Fashion-MNIST when installed, else digits), a fixed test sample."""
    rng = np.random.default_rng(seed)
    if fashion_data.installed():
        sources = {"train": fashion_data.load("train"), "test": fashion_data.load("test")}
        kind = f"fashion-mnist {shots}/class"
    else:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = (digits.images * (255.0 / 16.0)).astype(np.uint8)
        order = rng.permutation(len(pixels))
        cut = len(order) // 2
        sources = {
            "train": (pixels[order[:cut]], digits.target[order[:cut]]),
            "test": (pixels[order[cut:]], digits.target[order[cut:]]),
        }
        kind = f"digits {shots}/class"
    for split, count in (("train", shots), ("test", test_per_class)):
        images, targets = sources[split]
        for label in np.unique(targets):
            chosen = rng.choice(np.flatnonzero(targets == label), count, replace=False)
            for index in chosen:
                _save(images[index], work / split / str(label), f"{index:05d}")
    return kind


def plain_loop(train_dir: Path, test_dir: Path, size: int = 128, epochs: int = 6, seed: int = 0) -> float:
    """The issue's plain loop: full fine-tune at 128 px, AdamW, warmup + cosine, mild affine, 6 epochs."""
    import torch
    from torchvision.transforms import v2

    from finetune.modeling import create_model_and_transforms

    torch.manual_seed(seed)
    classes = sorted(p.name for p in train_dir.iterdir() if p.is_dir())

    def load(folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((folder / c).iterdir())]
        pixels = [
            np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BICUBIC)) for f, _ in files
        ]
        x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
        return x, torch.tensor([i for _, i in files])

    created = create_model_and_transforms(num_classes=len(classes))
    model = created.model.to(memory_format=torch.channels_last)
    mean = torch.tensor(created.data_config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(created.data_config["std"]).view(1, 3, 1, 1)
    train_x, train_y = load(train_dir)
    test_x, test_y = load(test_dir)
    augment = v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    batch = 32
    steps = epochs * math.ceil(len(train_x) / batch)
    warmup = max(1, steps // epochs)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: (
            (s + 1) / warmup
            if s < warmup
            else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        ),
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    for _ in range(epochs):
        model.train()
        for chosen in torch.randperm(len(train_x)).split(batch):
            x = torch.stack([augment(image) for image in train_x[chosen]])
            with autocast:
                loss = torch.nn.functional.cross_entropy(model((x - mean) / std), train_y[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    correct = 0
    with torch.inference_mode(), autocast:
        for start in range(0, len(test_x), 128):
            logits = model((test_x[start : start + 128] - mean) / std)
            correct += int((logits.argmax(1) == test_y[start : start + 128]).sum())
    return correct / len(test_x)


def run_method(method: str, train_dir: Path, test_dir: Path, run_dir: Path, extra: list[str]) -> dict:
    """One method in a child process: held-out top-1, wall seconds, peak RSS (GB)."""
    if method == "default":
        wall, rss, _ = timed_command(
            [sys.executable, "-m", "finetune", str(train_dir), "--out", str(run_dir), "--quiet", *extra]
        )
        _, _, out = timed_command(
            [sys.executable, "-m", "finetune.evaluate", str(test_dir), "--checkpoint", str(run_dir), "--json"]
        )
        studio = json.loads((run_dir / "config.json").read_text())["studio"]
        history = json.loads((run_dir / "metrics.json").read_text())["epochs"]
        note = (
            f"{studio['metrics']['strategy_used']} {studio['dataset']['image_size']}px "
            f"{max(row['epoch'] for row in history)}ep"
        )
        return {"top1": json.loads(out)["top1"], "wall_s": wall, "rss_gb": rss, "note": note}
    wall, rss, out = timed_command(
        [sys.executable, __file__, "--worker", method, str(train_dir), str(test_dir)]
    )
    return {"top1": float(out.strip().splitlines()[-1]), "wall_s": wall, "rss_gb": rss, "note": ""}


def worker(method: str, train_dir: Path, test_dir: Path) -> None:
    if method == "probe":
        print(linear_probe_baseline(train_dir, test_dir)[0])
    else:
        print(plain_loop(train_dir, test_dir))


BUILDERS: dict[str, Callable[[Path, int], object]] = {
    "digits": lambda work, seed: build_digits(work, seed),
    "textures": build_textures,
    "faces": build_faces,
    "fewshot": build_fewshot,
}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", default=",".join(BUILDERS), help="comma-separated sets (default: all)")
    parser.add_argument(
        "--seeds", default="0,1,2", help="digits seeds (default 0,1,2); other sets use the first"
    )
    parser.add_argument(
        "--all-seeds", action="store_true", help="every set runs every seed (default: only digits)"
    )
    parser.add_argument("--shots", type=int, default=10, help="few-shot training images per class (10)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated methods (default: all)")
    parser.add_argument("--work", type=Path, help="working folder (default: a temporary one)")
    parser.add_argument("--worker", nargs=3, metavar=("METHOD", "TRAIN", "TEST"), help=argparse.SUPPRESS)
    parser.add_argument("extra", nargs="*", help="extra flags for python -m finetune (after --)")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker[0], Path(args.worker[1]), Path(args.worker[2]))
        return 0
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    work = args.work or Path(tempfile.mkdtemp(prefix="recipe-bench-"))
    results: dict[tuple[str, str], list[dict]] = {}
    print(f"{'set':<10} {'seed':>4} {'method':<8} {'top-1':>7} {'wall s':>7} {'RSS GB':>7}  note", flush=True)
    for name in args.only.split(","):
        for seed in seeds if name == "digits" or args.all_seeds else seeds[:1]:
            data = work / f"{name}-{seed}"
            if name == "fewshot":
                build_fewshot(data, seed, args.shots)
            else:
                BUILDERS[name](data, seed)
            for method in methods:
                started = time.perf_counter()
                row = run_method(method, data / "train", data / "test", data / f"run-{method}", args.extra)
                row["bench_s"] = time.perf_counter() - started
                results.setdefault((name, method), []).append(row)
                print(
                    f"{name:<10} {seed:>4} {method:<8} {row['top1']:>7.4f} {row['wall_s']:>7.1f} "
                    f"{row['rss_gb']:>7.2f}  {row['note']}",
                    flush=True,
                )
    print("\nmean over seeds (top-1 / wall s / peak RSS GB):")
    for (name, method), rows in results.items():
        tops = [r["top1"] for r in rows]
        spread = f" (min {min(tops):.4f}, max {max(tops):.4f})" if len(rows) > 1 else ""
        print(
            f"  {name:<10} {method:<8} {statistics.mean(tops):.4f}{spread}  "
            f"{statistics.mean(r['wall_s'] for r in rows):.1f} s  {max(r['rss_gb'] for r in rows):.2f} GB"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
