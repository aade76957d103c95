"""open_image: every mode and container users throw at us becomes RGB, and bad files become ImageError."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from finetune.errors import ImageError
from finetune.images import open_image


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "1", "CMYK", "I;16", "I", "F", "YCbCr"])
def test_open_image_converts_every_mode_to_rgb(tmp_path: Path, mode: str) -> None:
    source = photo("chelsea").resize((64, 48))
    if mode in ("I;16", "I", "F"):
        converted = Image.fromarray(
            (np.asarray(source.convert("L"), dtype=np.uint16) * 200).astype(np.uint16)
        )
        converted = converted.convert(mode) if mode != "I;16" else converted
    else:
        converted = source.convert(mode)
    suffix = ".tiff" if mode in ("CMYK", "I;16", "I", "F", "YCbCr") else ".png"
    path = tmp_path / f"image{suffix}"
    if mode == "YCbCr":
        path = tmp_path / "image.jpg"
    converted.save(path)
    image = open_image(path)
    assert image.mode == "RGB"
    assert image.size == (64, 48)
    assert np.asarray(image).std() > 5  # still a picture, not a flat page


def test_sixteen_bit_image_is_stretched_not_clipped_to_white(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    pixels = np.asarray(open_image(path))
    assert pixels.min() == 0 and pixels.max() == 255


def test_transparent_pixels_become_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    path = tmp_path / "clear.png"
    rgba.save(path)
    assert np.asarray(open_image(path))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = photo("chelsea").resize((80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif)
    assert open_image(path).size == (40, 80)


def test_animated_gif_gives_its_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((250, 0, 0), (0, 250, 0), (0, 0, 250))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    red, green, _ = np.asarray(open_image(path))[8, 8].tolist()
    assert red > 200 and green < 50


def test_draft_decoding_shrinks_large_jpegs(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    photo("astronaut").resize((2048, 2048)).save(path)
    assert max(open_image(path, draft_size=(224, 224)).size) < 2048
    assert min(open_image(path, draft_size=(224, 224)).size) >= 224


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"", "empty"),
        (b"this is a text file, not a picture", "not an image"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not an image|could not be decoded"),
    ],
)
def test_bad_bytes_raise_image_error(payload: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        open_image(payload)


def test_truncated_jpeg_raises_image_error(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    photo("coffee").save(buffer, format="JPEG")
    path = tmp_path / "truncated.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 3])
    with pytest.raises(ImageError, match="truncated|corrupt|decoded"):
        open_image(path)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    Image.new("1", (10_000, 10_000)).save(path)  # 100 megapixels in a few kilobytes
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageError, match="too large|limit"):
        open_image(path)


def test_missing_file_and_one_pixel_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        open_image(tmp_path / "nope.jpg")
    path = tmp_path / "dot.png"
    Image.new("RGB", (1, 1), (10, 20, 30)).save(path)
    assert open_image(path).size == (1, 1)
