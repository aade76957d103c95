"""Files visitors upload that are not plain RGB photos: the broken ones and the unusual-but-valid ones.

Shared by the service, app and browser tests so that each layer is checked against the same real files.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from conftest import photo
from PIL import Image

# name -> words the refusal message must contain
BROKEN = {
    "not_an_image.jpg": "not an image",
    "truncated.jpg": "truncated",
    "empty.png": "empty",
    "bomb.png": "too large",
    "one_pixel.png": "too small",
}
UNUSUAL = ("cmyk.jpg", "sixteen_bit.png", "palette.png", "rgba.png", "animated.gif", "grayscale.png")


def write_broken_files(folder: Path) -> dict[str, Path]:
    """Each kind of unusable upload, as a real file on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    photo("chelsea").save(jpeg, format="JPEG", quality=90)
    contents = {
        "not_an_image.jpg": b"this is a text file with a .jpg name\n" * 20,
        "truncated.jpg": jpeg.getvalue()[: len(jpeg.getvalue()) // 3],
        "empty.png": b"",
    }
    for name, data in contents.items():
        (folder / name).write_bytes(data)
    # 10,000 x 10,000 = 100 megapixels in a few kilobytes: a decompression bomb.
    Image.new("1", (10_000, 10_000)).save(folder / "bomb.png")
    Image.new("RGB", (1, 1), (200, 30, 30)).save(folder / "one_pixel.png")
    return {name: folder / name for name in BROKEN}


def write_unusual_images(folder: Path) -> dict[str, Path]:
    """Valid images in modes and formats a photo pipeline often gets wrong."""
    folder.mkdir(parents=True, exist_ok=True)
    chelsea = photo("chelsea")
    chelsea.convert("CMYK").save(folder / "cmyk.jpg")
    gray = np.asarray(chelsea.convert("L"), dtype=np.uint16) * 257
    Image.fromarray(gray).save(folder / "sixteen_bit.png")  # mode I;16
    chelsea.convert("P", palette=Image.ADAPTIVE, colors=64).save(folder / "palette.png")
    rgba = chelsea.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(chelsea.size))
    rgba.save(folder / "rgba.png")
    frames = [chelsea, photo("coffee").resize(chelsea.size)]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=200, loop=0)
    chelsea.convert("L").save(folder / "grayscale.png")
    return {name: folder / name for name in UNUSUAL}
