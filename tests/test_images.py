"""open_image: every mode and container users throw at us becomes RGB, and bad files become ImageError."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import hostile_files
import numpy as np
import pytest
from conftest import photo
from PIL import Image

from finetune.decode_budget import DecodeBudget
from finetune.errors import ImageError
from finetune.images import UPLOAD_LIMITS, image_size, open_image


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


def test_phone_mpo_photo_opens_as_its_first_picture() -> None:
    data = hostile_files.mpo(size=(64, 48))
    with Image.open(io.BytesIO(data)) as plain:
        assert plain.format == "MPO"
    assert open_image(data, limits=UPLOAD_LIMITS).size == (64, 48)


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "TIFF"])
def test_exif_orientation_is_applied_from_small_blocks_in_other_formats(tmp_path: Path, fmt: str) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{fmt.lower()}"
    photo("chelsea").resize((80, 40)).save(path, fmt, exif=exif)
    assert open_image(path).size == (40, 80)


def test_aspect_ratio_limit_keeps_20_to_1_and_refuses_beyond(tmp_path: Path) -> None:
    Image.new("RGB", (400, 20), "gray").save(tmp_path / "banner.png")
    Image.new("RGB", (21, 441), "gray").save(tmp_path / "strip.png")
    assert open_image(tmp_path / "banner.png").size == (400, 20)
    with pytest.raises(ImageError, match=r"21x441 pixels, a 21:1 strip; crop it to at most 20:1"):
        open_image(tmp_path / "strip.png")


def test_upload_limits_refuse_tiny_images_that_local_limits_allow() -> None:
    data = hostile_files.png((3, 3))
    assert open_image(data).size == (3, 3)
    with pytest.raises(ImageError, match="only 3x3 pixels, too small"):
        open_image(data, limits=UPLOAD_LIMITS)


def test_large_jpeg_upload_is_fine_when_drafted_but_not_at_full_size(tmp_path: Path) -> None:
    """30 MP: above the upload decode limit at full size, 1/8 of it (0.5 MP) with a draft size."""
    path = tmp_path / "big.jpg"
    Image.new("RGB", (6000, 5000), (90, 120, 30)).save(path, quality=50)
    assert min(open_image(path, draft_size=(292, 292), limits=UPLOAD_LIMITS).size) >= 292
    with pytest.raises(ImageError, match="more than the 25,000,000 this server decodes"):
        open_image(path, limits=UPLOAD_LIMITS)


def test_large_png_is_reduced_right_after_decoding_never_below_the_draft_size(tmp_path: Path) -> None:
    path = tmp_path / "big.png"
    photo("astronaut").resize((2048, 1536)).save(path)
    image = open_image(path, draft_size=(300, 300))
    assert image.size == (410, 308)  # 1/5 (rounded up): the largest whole factor that keeps both >= 300
    assert open_image(path).size == (2048, 1536)


def test_messages_name_the_file_as_the_caller_named_it(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match=r"^'cat\.png' is not an image"):
        open_image(b"not a picture", name="cat.png")
    with pytest.raises(ImageError, match=r"^the uploaded file is not an image"):
        open_image(io.BytesIO(b"not a picture"))
    with pytest.raises(ImageError) as raised:
        open_image(b"not a picture")
    assert str(tmp_path) not in str(raised.value) and "/" not in str(raised.value).split(";")[0]


def test_image_size_reads_the_header_only(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    photo("coffee").save(path)
    assert image_size(path) == photo("coffee").size
    (tmp_path / "fake.png").write_bytes(hostile_files.pcx())
    with pytest.raises(ImageError, match="PCX"):
        image_size(tmp_path / "fake.png")


def test_every_decode_reserves_its_pixels_from_the_process_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    reserved: list[int] = []
    budget = DecodeBudget(10**9)
    original = budget.reserve

    def recording(nbytes: int):  # noqa: ANN202
        reserved.append(nbytes)
        return original(nbytes)

    monkeypatch.setattr(budget, "reserve", recording)
    monkeypatch.setattr("finetune.images.DECODE_BUDGET", budget)
    open_image(hostile_files.png((100, 50)))
    assert reserved == [100 * 50 * 4]  # RGB: 4 bytes per pixel in Pillow, no conversion copy
    assert budget.in_flight == 0


def test_decode_budget_makes_a_decode_that_does_not_fit_wait_its_turn() -> None:
    budget = DecodeBudget(100)
    first_inside, release_first, second_inside = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with budget.reserve(60):
            first_inside.set()
            release_first.wait(10)

    def second() -> None:
        with budget.reserve(60):
            second_inside.set()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    threads[0].start()
    assert first_inside.wait(10)
    threads[1].start()
    assert not second_inside.wait(0.2)  # 60 + 60 > 100: it waits (it can only enter early by a bug)
    release_first.set()
    assert second_inside.wait(10)
    for thread in threads:
        thread.join(10)
    with budget.reserve(500):  # larger than the whole budget: still runs, alone
        assert budget.in_flight == 500
    assert budget.in_flight == 0
