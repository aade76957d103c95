"""Small real multi-label datasets for tests: mosaics of sklearn's handwritten digits, with a labels.csv.

Each image is a 2x2 grid whose cells are empty or hold a real digit (0, 1 or 2); its labels are the digits
present (`zero one two`), so an image may show several labels, or none (a negative).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

NAMES = ("zero", "one", "two")
CELL = 24  # px per cell; images are 2 * CELL square


def write_digit_mosaics(root: Path, count: int = 48, seed: int = 0, name: str = "labels.csv") -> Path:
    """`root/images/*.png` and `root/<name>`; returns the CSV's path. Every label appears many times."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pools = {d: np.flatnonzero(digits.target == d) for d in range(len(NAMES))}
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for n in range(count):
        canvas = np.zeros((2 * CELL, 2 * CELL), np.uint8)
        present: set[int] = set()
        for cell in range(4):
            if rng.random() < 0.45:
                continue  # an empty cell
            digit = int(rng.integers(len(NAMES)))
            pixels = digits.images[rng.choice(pools[digit])] * (255.0 / 16.0)
            tile = Image.fromarray(pixels.astype(np.uint8)).resize((CELL, CELL), Image.BICUBIC)
            row, column = divmod(cell, 2)
            canvas[row * CELL : (row + 1) * CELL, column * CELL : (column + 1) * CELL] = np.asarray(tile)
            present.add(digit)
        path = Path("images") / f"m{n:03d}.png"
        Image.fromarray(canvas).convert("RGB").save(root / path)
        rows.append((path.as_posix(), " ".join(NAMES[d] for d in sorted(present))))
    csv_path = root / name
    with csv_path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["path", "labels"])
        writer.writerows(rows)
    return csv_path
