"""Hostile image files against `open_image`: refused formats, parser bombs, thin strips, many frames.

Each file comes from `tests/hostile_files.py` and is written under an innocent name (`photo.png`). Memory is
measured in a fresh subprocess (its peak RSS, `VmHWM`, before and after one open), where the figure is robust:
the bombs cost gigabytes before the fix and a few megabytes after. Times are printed, never asserted.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import hostile_files
import pytest
from PIL import EpsImagePlugin, GifImagePlugin, Image

from demo.uploads import import_class_files
from finetune.errors import ImageError
from finetune.images import LOCAL_LIMITS, UPLOAD_LIMITS, open_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_ghostscript(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `gs` first on PATH that only leaves a marker file; returns the marker's path (absent until run)."""
    marker = tmp_path / "gs-was-started"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "gs"
    script.write_text(f"#!/bin/sh\ntouch '{marker}'\nexit 0\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", None)  # forget any earlier lookup
    return marker


def test_fake_ghostscript_is_what_plain_pillow_would_start(tmp_path: Path, fake_ghostscript: Path) -> None:
    """The control: plain `Image.open` on the EPS does run `gs`, so the marker check below can fail."""
    path = tmp_path / "photo.png"
    path.write_bytes(hostile_files.eps())
    with contextlib.suppress(Exception), Image.open(path) as image:
        image.load()  # fails after the fake `gs` ran: it writes no picture
    assert fake_ghostscript.exists()


@pytest.mark.parametrize("fmt", hostile_files.REFUSED_FORMATS)
def test_other_decoders_are_refused_whatever_the_name(
    tmp_path: Path, fake_ghostscript: Path, fmt: str
) -> None:
    data = hostile_files.refused_format(fmt)
    with Image.open(io.BytesIO(data)) as plain:  # Pillow alone would decode it
        assert plain.format == fmt
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(ImageError, match="not an image PIL can read as JPEG, PNG, WebP, BMP, GIF"):
            open_image(source, limits=UPLOAD_LIMITS)
    assert not fake_ghostscript.exists(), "a subprocess (Ghostscript) was started"


def test_eps_message_names_what_the_content_is(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    path.write_bytes(hostile_files.eps())
    with pytest.raises(ImageError, match=r"'.*photo.png' is not an image .*: its content is PostScript/EPS"):
        open_image(path)


def test_zip_and_class_uploads_skip_a_refused_format(tmp_path: Path, fake_ghostscript: Path) -> None:
    files = tmp_path / "in"
    files.mkdir()
    (files / "0.png").write_bytes(hostile_files.eps())
    for index in range(3):
        (files / f"{index + 1}.png").write_bytes(hostile_files.png((48, 48)))
    classes = [("cat", [files / "0.png", files / "1.png"]), ("dog", [files / "2.png", files / "3.png"])]
    imported = import_class_files(classes, tmp_path / "datasets")
    assert imported.class_counts == {"cat": 1, "dog": 2}
    assert [item.name for item in imported.skipped] == ["cat/0.png"]
    assert "EPS" in imported.skipped[0].reason
    assert not fake_ghostscript.exists()


def _measure_open(tmp_path: Path, data: bytes, limits: str = "UPLOAD_LIMITS") -> dict:
    """Open `data` once in a fresh process; its outcome, seconds and peak-RSS growth in MB."""
    path = tmp_path / "photo.png"
    path.write_bytes(data)
    code = textwrap.dedent(
        f"""
        import json, time
        from finetune.errors import ImageError
        from finetune.images import {limits}, open_image

        def peak_mb():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM"):
                    return int(line.split()[1]) / 1024

        before, start = peak_mb(), time.perf_counter()
        try:
            outcome = list(open_image({str(path)!r}, draft_size=(292, 292), limits={limits}).size)
        except ImageError as error:
            outcome = str(error)
        print(json.dumps({{"outcome": outcome, "seconds": time.perf_counter() - start,
                          "peak_mb": peak_mb() - before}}))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_png_exif_bomb_opens_without_parsing_the_block(tmp_path: Path) -> None:
    """64x48 PNG with a 4 MB eXIf chunk: 600 entries x 4 MB (7.4 s and +2.4 GB through Pillow's getexif)."""
    figures = _measure_open(tmp_path, hostile_files.exif_bomb_png(size=(64, 48)))
    print(f"\nPNG EXIF bomb: {figures}")
    assert figures["outcome"] == [64, 48]  # opened; its orientation (6) is skipped with a note
    assert figures["peak_mb"] < 256


def test_jpeg_exif_bomb_is_refused_before_pillow_parses_it(tmp_path: Path) -> None:
    """Pillow reads a JPEG's EXIF at open (for its DPI): 2000 entries in 64 KB took 114 s and +307 MB."""
    figures = _measure_open(tmp_path, hostile_files.exif_bomb_jpeg())
    print(f"\nJPEG EXIF bomb: {figures}")
    assert "metadata" in figures["outcome"] and "re-save it" in figures["outcome"]
    assert figures["peak_mb"] < 128


def test_tiff_ifd_bomb_is_refused_before_pillow_parses_it(tmp_path: Path) -> None:
    figures = _measure_open(tmp_path, hostile_files.tiff_ifd_bomb())
    print(f"\nTIFF IFD bomb: {figures}")
    assert "metadata" in figures["outcome"]
    assert figures["peak_mb"] < 128


def test_png_text_bomb_is_refused_before_pillow_inflates_it(tmp_path: Path) -> None:
    """64 zTXt chunks of ~1 KB each inflating to 1 MB: Pillow would keep 64 MB per request."""
    data = hostile_files.png_text_bomb()
    assert len(data) < 100_000
    figures = _measure_open(tmp_path, data)
    print(f"\nPNG text bomb: {figures}")
    assert "metadata" in figures["outcome"]
    assert figures["peak_mb"] < 32


def test_one_large_metadata_block_is_fine_when_the_file_holds_it(tmp_path: Path) -> None:
    """A 17 MiB private TIFF tag (as layered Photoshop TIFFs have) is read once: no bomb."""
    assert open_image(hostile_files.tiff_ifd_bomb(blob_bytes=17 * 1024**2, entries=1)).size == (16, 16)


@pytest.mark.parametrize(
    ("builder", "message"),
    [
        ("jpeg_many_segments", "more than 1,000 JPEG header segments"),
        ("jpeg_junk", "more than 65,536 stray bytes"),
    ],
)
def test_jpeg_headers_built_to_be_slow_are_refused(builder: str, message: str) -> None:
    data = getattr(hostile_files, builder)()
    start = time.perf_counter()
    with pytest.raises(ImageError, match=f"malformed headers \\({message}"):
        open_image(data, limits=UPLOAD_LIMITS)
    print(f"\n{builder} ({len(data):,} bytes) refused in {time.perf_counter() - start:.3f} s")


def test_thin_strip_is_refused_before_any_resize(tmp_path: Path) -> None:
    """A few hundred bytes of 4x20000 PNG became 256x1,280,000 pixels (+1.4 GB) at the resize step."""
    figures = _measure_open(tmp_path, hostile_files.thin_png())
    print(f"\nthin 4x20000 PNG: {figures}")
    assert "4x20000" in figures["outcome"] and "crop it to at most 20:1" in figures["outcome"]
    assert figures["peak_mb"] < 64


def test_webp_with_a_large_exif_block_opens_without_orientation(tmp_path: Path) -> None:
    image = open_image(hostile_files.exif_bomb_webp(size=(64, 48)))
    assert image.size == (64, 48)


def test_header_claiming_ten_gigapixels_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="too large"):
        open_image(hostile_files.huge_header_png())


def test_upload_limit_refuses_a_small_file_that_decodes_to_64_megapixels(tmp_path: Path) -> None:
    data = hostile_files.big_png(8000, 8000)
    assert len(data) < 250_000
    with pytest.raises(ImageError, match="8000x8000 pixels, more than the 25,000,000 this server decodes"):
        open_image(data, draft_size=(292, 292), limits=UPLOAD_LIMITS)


def test_gif_with_thousands_of_frames_opens_its_first_frame_without_counting(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def counting_frames(self: object) -> int:
        raise AssertionError("n_frames reads every frame of the file")

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "n_frames", property(counting_frames))
    data = hostile_files.many_frame_gif(frames=3000)
    start = time.perf_counter()
    image = open_image(data, limits=UPLOAD_LIMITS)
    print(f"\n3000-frame GIF opened in {time.perf_counter() - start:.3f} s")
    assert image.size == (16, 16)
    assert image.getpixel((0, 0)) == (255, 255, 255)  # frame 0 lights pixel (0, 0)


@pytest.mark.parametrize("name", sorted(hostile_files.mode_variants()))
def test_unusual_but_valid_files_still_open(name: str) -> None:
    image = open_image(hostile_files.mode_variants()[name], limits=LOCAL_LIMITS)
    assert image.mode == "RGB"
