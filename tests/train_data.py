"""Small real-image datasets for the Train tab tests: two classes cut from scikit-image photos, and zips.

`cat` crops come from chelsea.jpg and `coffee` crops from coffee.jpg, each shifted, scaled, flipped and
brightened differently, so the classes are real photos with real variation; the held-out images are crops
that no training image shares.
"""

from __future__ import annotations

import io
import stat
import zipfile
from pathlib import Path

import numpy as np
from conftest import photo
from PIL import Image, ImageEnhance

CLASSES = {"cat": "chelsea", "coffee": "coffee"}


def augmented_crops(name: str, count: int, size: int, seed: int) -> list[Image.Image]:
    """`count` random crops (40-90% of the short side) of a packaged photo, resized to `size`."""
    source = photo(name)
    rng = np.random.default_rng(seed)
    width, height = source.size
    crops = []
    for _ in range(count):
        side = int(min(width, height) * rng.uniform(0.4, 0.9))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = source.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(ImageEnhance.Brightness(crop).enhance(float(rng.uniform(0.8, 1.2))))
    return crops


def write_photo_classes(root: Path, per_class: int = 8, size: int = 96, seed: int = 0) -> Path:
    """`root/cat/*.jpg` and `root/coffee/*.jpg`: two classes of real photo crops."""
    for index, (label, name) in enumerate(CLASSES.items()):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for n, crop in enumerate(augmented_crops(name, per_class, size, seed + index)):
            crop.save(folder / f"{label}_{n:02d}.jpg", quality=90)
    return root


def held_out_image(label: str, path: Path, size: int = 96) -> Path:
    """A crop of the class's photo from a seed no training set uses."""
    augmented_crops(CLASSES[label], 1, size, seed=999)[0].save(path, quality=90)
    return path


def zip_folder(folder: Path, zip_path: Path, prefix: str = "") -> Path:
    """Zip every file under `folder` with relative paths (under `prefix/` when given)."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, f"{prefix}{path.relative_to(folder).as_posix()}")
    return zip_path


def photo_zip(tmp_path: Path, per_class: int = 8, size: int = 96, prefix: str = "photos/") -> Path:
    """A zip of the two photo classes inside one top folder, the way zipping a folder makes it."""
    folder = write_photo_classes(tmp_path / "photo-classes", per_class=per_class, size=size)
    return zip_folder(folder, tmp_path / "photos.zip", prefix=prefix)


def jpeg_bytes(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    augmented_crops("chelsea", 1, size, seed=5)[0].save(buffer, format="JPEG")
    return buffer.getvalue()


def add_symlink(archive: zipfile.ZipFile, name: str, target: str) -> None:
    """A Unix symlink entry, as `zip --symlinks` writes it."""
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive.writestr(info, target)
