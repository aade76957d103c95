"""Fashion-MNIST from Debian's `dataset-fashion-mnist` package: one reader for every benchmark that uses it.

The package installs the original `*-ubyte.gz` files (MIT licence): 60,000 training and the official 10,000
test images, 28x28 grayscale, 10 classes. Published test top-1: SVC 89.7%, small CNNs ~93-94%,
ResNet-18 94.9%, wide ResNets ~96%.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")
FILES = {"train": "train", "test": "t10k"}  # our split name -> the file prefix


def installed() -> bool:
    return all((SOURCE / f"{prefix}-images-idx3-ubyte.gz").is_file() for prefix in FILES.values())


def require() -> None:
    """Stop with the command that installs the data when it is missing."""
    if not installed():
        raise SystemExit(
            f"Fashion-MNIST is not in {SOURCE}; install it with `apt-get install -y dataset-fashion-mnist` "
            "(as root; prefix sudo as a user)."
        )


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format): a magic number whose last byte is the number of dimensions."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def load(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels N) of "train" or "test"."""
    require()
    prefix = FILES[split]
    return (
        read_idx(SOURCE / f"{prefix}-images-idx3-ubyte.gz"),
        read_idx(SOURCE / f"{prefix}-labels-idx1-ubyte.gz"),
    )


def write_class_folders(root: Path, split: str) -> list[Path]:
    """`root/<class>/<index>.png` for every image of `split`, written once (a marker says it finished).

    An interrupted conversion leaves no marker and is redone whole: every file is rewritten, none trusted.
    """
    done = root / ".complete"
    if not done.exists():
        images, labels = load(split)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f"{index:05d}.png")
        done.touch()
    return sorted(root.rglob("*.png"))
