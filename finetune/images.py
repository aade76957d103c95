"""Opening images: the one place that turns a file, bytes or an upload into a clean RGB `PIL.Image`.

Training, evaluation, prediction and the app all open images here, so every path gets the same rules:
- only the decoders we promise run (JPEG and its multi-picture MPO form, PNG, WebP, BMP, GIF, TIFF),
  whatever the file is named: Pillow's other plugins (EPS would start Ghostscript) never see user data;
- metadata is bounded: headers that would make Pillow copy or inflate more than `max_metadata_bytes` (and
  more than the file holds) are refused
  before it parses them, and EXIF orientation is read from small blocks only, by a 12-byte-entry scan;
- sizes are checked before any pixel is decoded: too many pixels, extreme aspect ratios, too few pixels;
- large images decode straight to the size the caller needs (JPEG draft, `Image.reduce` for the rest);
- a process-wide `DECODE_BUDGET` keeps concurrent large decodes from adding up;
- only the first frame of an animation or a multi-page file is decoded;
- any failure is an `ImageError` whose message names the file as the caller named it.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from PIL import Image, UnidentifiedImageError

from finetune.decode_budget import DECODE_BUDGET, TRIM_AFTER_BYTES, return_freed_memory
from finetune.errors import ImageError
from finetune.image_metadata import MalformedMetadataError, exif_block, metadata_copy_bytes, read_orientation

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
# Pillow decoders we allow, by their `Image.open(formats=...)` names. Phone photos that hold several pictures
# come back as "MPO": Pillow's JPEG opener returns them, so MPO needs no entry here (and has none in Pillow's
# open table: naming it would raise KeyError).
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
OPENED_FORMATS = frozenset((*ALLOWED_FORMATS, "MPO"))
FORMAT_NAMES = "JPEG, PNG, WebP, BMP, GIF or TIFF"
MAX_IMAGE_PIXELS = 64_000_000  # about 8000x8000; larger files are refused as likely decompression bombs
MAX_UPLOAD_DECODED_PIXELS = 25_000_000  # pixels one upload may decode to (100 MB as RGB in Pillow)
MAX_ASPECT_RATIO = 20.0  # longer / shorter side; see ImageLimits
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as most viewers show them
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# what the first bytes of a refused file are, to say so in the message (never used to pick a decoder)
_KNOWN_REFUSED = (
    (b"%!PS", "PostScript/EPS"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),
    (b"DDS ", "DDS"),
    (b"qoif", "QOI"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"\x01\xda", "SGI"),
    (b"Image type", "IM"),
    (b"8BPS", "Photoshop"),
    (b"\x00\x00\x00\x0cjP", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"%PDF", "PDF"),
    (b"<svg", "SVG"),
    (b"<?xml", "XML/SVG"),
)

ImageSource = str | Path | bytes | BinaryIO | Image.Image


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost to open: `LOCAL_LIMITS` for the user's files, `UPLOAD_LIMITS` for strangers'.

    The aspect-ratio limit exists because every consumer resizes the *shorter* side to a fixed length
    (256 px for classification, 512 for Explain): a 4x20000 image became 256x1,280,000 pixels (1.4 GB).
    At 20:1 the resized image stays under 256 x 5120 (5 MB) while tall phone screenshots (about 9:1),
    long scrolling captures (up to ~18:1) and 360-degree panoramas (2:1 to 10:1) still open.
    """

    max_pixels: int = MAX_IMAGE_PIXELS  # width x height in the file's header
    max_decoded_pixels: int = MAX_IMAGE_PIXELS  # pixels actually decoded (a drafted JPEG counts reduced)
    max_aspect_ratio: float = MAX_ASPECT_RATIO  # longer / shorter side
    min_side: int = 1  # pixels on the shorter side
    max_exif_bytes: int = 64 * 1024  # EXIF blocks read for orientation; larger ones are skipped with a note
    max_metadata_bytes: int = 16 * 1024**2  # header bytes Pillow may copy or inflate (or up to the file size)


LOCAL_LIMITS = ImageLimits()
# Uploads come from strangers. PNG, WebP, BMP, GIF and TIFF decode at full size whatever size is needed, so
# they are held to 25 MP (~100 MB as RGB); a JPEG drafts at down to 1/8 scale, so a 64 MP photo opened with
# a `draft_size` decodes to 1 MP and is fine. The smallest side matches what the app can classify.
UPLOAD_LIMITS = ImageLimits(max_decoded_pixels=MAX_UPLOAD_DECODED_PIXELS, min_side=4)


def is_image_file(path: Path) -> bool:
    """True when the file name has one of the image extensions we accept (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def open_image(
    source: ImageSource,
    draft_size: tuple[int, int] | None = None,
    limits: ImageLimits = LOCAL_LIMITS,
    name: str | None = None,
) -> Image.Image:
    """Open `source` as an RGB image, EXIF-transposed, with transparency flattened onto white.

    `draft_size` is the smallest size the caller needs: large JPEGs decode at 1/2, 1/4 or 1/8 scale and
    other formats are reduced right after decoding, never below it. `limits` bound what the image may cost
    (`UPLOAD_LIMITS` for files from strangers). `name` is how messages call the file (default: the path as
    given, or "the uploaded file").
    """
    shown = f"'{name}'" if name else _describe(source)
    if isinstance(source, Image.Image):
        _check_size(source.size, shown, limits)
        return _finish(source, None, None, shown, limits)  # already decoded: no reduce, the memory is spent
    with _opened(source, shown, limits) as image:
        return _decode(image, draft_size, shown, limits)


def image_size(source: str | Path | bytes | BinaryIO, limits: ImageLimits = LOCAL_LIMITS) -> tuple[int, int]:
    """Width and height from the file's header, after the same format, metadata and size checks as
    `open_image`; decodes no pixels (a cheap probe, e.g. to suggest a training resolution)."""
    with _opened(source, _describe(source), limits) as image:
        return image.size


def decoded_bytes(source: str | Path | bytes | BinaryIO, limits: ImageLimits = LOCAL_LIMITS) -> int:
    """Bytes the decoded pixels of `source` would take (width x height x bands x bytes per band), from
    its header after `open_image`'s checks; decodes nothing (a dataset's total can be capped up front)."""
    with _opened(source, _describe(source), limits) as image:
        per_band = 2 if image.mode.startswith("I;16") else 4 if image.mode in ("I", "F") else 1
        return image.width * image.height * len(image.getbands()) * per_band


@contextmanager
def _opened(source: str | Path | bytes | BinaryIO, shown: str, limits: ImageLimits) -> Iterator[Image.Image]:
    """The file opened by an allowed decoder, headers checked, sizes checked; errors become `ImageError`."""
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{shown} is empty (0 bytes); upload a {FORMAT_NAMES} image.")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{shown} does not exist or is not a file.")
        if path.stat().st_size == 0:
            raise ImageError(f"{shown} is empty (0 bytes); it is not an image.")
    try:
        with _seekable(source) as fp:
            _check_metadata(fp, shown, limits)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(fp, formats=ALLOWED_FORMATS) as image:
                    if image.format not in OPENED_FORMATS:  # Pillow honours `formats`; guard plugin changes
                        raise ImageError(f"{shown} is a {image.format} file; use a {FORMAT_NAMES} image.")
                    _check_size(image.size, shown, limits)
                    yield image
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        # Pillow's own limit (89 MP) is above ours, so this is a header claiming more than `max_pixels`
        raise ImageError(
            f"{shown} is too large to open safely: its header claims more than {limits.max_pixels:,} "
            "pixels; resize it before uploading."
        ) from error
    except UnidentifiedImageError as error:
        raise ImageError(_unidentified_message(source, shown)) from error
    except (OSError, ValueError, SyntaxError, EOFError, MemoryError) as error:
        raise ImageError(f"{shown} could not be decoded (truncated or corrupt?): {error}") from error


def _decode(
    image: Image.Image, draft_size: tuple[int, int] | None, shown: str, limits: ImageLimits
) -> Image.Image:
    """Draft, decode the first frame within the budget, then finish to RGB."""
    if draft_size is not None and image.format in ("JPEG", "MPO"):
        image.draft("RGB", draft_size)
    width, height = image.size
    if width * height > limits.max_decoded_pixels:
        raise ImageError(
            f"{shown} is {width}x{height} pixels, more than the {limits.max_decoded_pixels:,} this server "
            f"decodes for a {image.format} image; resize it (or send a JPEG) and try again."
        )
    cost = _decode_bytes(image)
    with DECODE_BUDGET.reserve(cost):
        image.load()  # the first frame only: nothing here seeks or counts frames (`n_frames` reads them all)
        reduce_to = draft_size if image.format not in ("JPEG", "MPO") else None
        result = _finish(image, image.format, reduce_to, shown, limits)
        image.close()  # drop the full-size pixels now, while the budget still counts them
    if cost >= TRIM_AFTER_BYTES:
        return_freed_memory()
    return result


def _finish(
    image: Image.Image,
    fmt: str | None,
    reduce_to: tuple[int, int] | None,
    shown: str,
    limits: ImageLimits,
) -> Image.Image:
    """To RGB, reduced by a whole factor while staying >= `reduce_to`, then EXIF-transposed."""
    orientation = _orientation(image, shown, limits)
    rgb = _to_rgb(image)
    if reduce_to is not None:
        factor = min(rgb.width // reduce_to[0], rgb.height // reduce_to[1])
        if factor >= 2:  # like JPEG draft: never below the size asked for
            rgb = rgb.reduce(factor)
    if orientation in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[orientation])
    if rgb is image and fmt is None:
        rgb = image.copy()  # never hand out (or change the info of) the caller's own object
    elif rgb is image:
        # a new Image over the decoded pixels, detached from the closed file: no second full-size copy
        rgb = image._new(image.im)
    for key in ("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"):
        rgb.info.pop(key, None)  # orientation is applied; nothing downstream should apply it again
    return rgb


@contextmanager
def _seekable(source: str | Path | BinaryIO) -> Iterator[BinaryIO]:
    """A seekable binary file for `source`; paths are opened and closed here, streams are read if needed."""
    if isinstance(source, (str, Path)):
        with open(source, "rb") as handle:
            yield handle
        return
    try:
        source.seek(0)
    except (AttributeError, io.UnsupportedOperation):
        yield io.BytesIO(source.read())
        return
    yield source


def _check_metadata(fp: BinaryIO, shown: str, limits: ImageLimits) -> None:
    """Refuse headers built to make Pillow's own parsing copy gigabytes or loop for long.

    Metadata may cost what the file holds (a layered TIFF's 50 MB Photoshop tag is read once) or up to
    `max_metadata_bytes`; more than both means entries share data or text inflates: a bomb.
    """
    file_bytes = fp.seek(0, 2)
    fp.seek(0)
    prefix = fp.read(16)
    try:
        copied = metadata_copy_bytes(fp, prefix)
    except MalformedMetadataError as error:
        raise ImageError(
            f"{shown} has malformed headers ({error}); re-save it with an image editor."
        ) from error
    finally:
        fp.seek(0)
    if copied > limits.max_metadata_bytes and copied > file_bytes:
        raise ImageError(
            f"{shown} has metadata that would take {copied / 2**20:,.0f} MiB to read (the limit is "
            f"{limits.max_metadata_bytes / 2**20:,.0f} MiB); re-save it without metadata."
        )


def _check_size(size: tuple[int, int], shown: str, limits: ImageLimits) -> None:
    width, height = size
    if width < 1 or height < 1:
        raise ImageError(f"{shown} has no pixels ({width}x{height}).")
    if min(width, height) < limits.min_side:
        raise ImageError(
            f"{shown} is only {width}x{height} pixels, too small to use; use an image at least "
            f"{limits.min_side} pixels on each side."
        )
    if max(width, height) / min(width, height) > limits.max_aspect_ratio:
        raise ImageError(
            f"{shown} is {width}x{height} pixels, a {max(width, height) / min(width, height):,.0f}:1 strip; "
            f"crop it to at most {limits.max_aspect_ratio:g}:1 (longer side / shorter side)."
        )
    if width * height > limits.max_pixels:
        raise ImageError(
            f"{shown} is {width}x{height} pixels, more than the limit of {limits.max_pixels:,}; "
            "resize it before uploading."
        )


def _decode_bytes(image: Image.Image) -> int:
    """Bytes `load()` and the RGB conversion will allocate (Pillow keeps multi-band pixels in 4 bytes)."""
    pixels = image.width * image.height
    bands = len(image.getbands())
    stored = 4 if bands > 1 or image.mode in ("I", "F") else 2 if image.mode.startswith("I;16") else 1
    return pixels * (stored + (0 if image.mode == "RGB" else 4))


def _orientation(image: Image.Image, shown: str, limits: ImageLimits) -> int:
    """EXIF orientation (1-8) from a bounded read; 1 when there is none or its block is too large."""
    tags = getattr(image, "tag_v2", None)  # a TIFF's own first IFD, parsed (bounded) at open
    if tags is not None:
        value = tags.get(0x0112, 1)
        return value if isinstance(value, int) and 1 <= value <= 8 else 1
    block = exif_block(image)
    if block is None:
        return 1
    if len(block) > limits.max_exif_bytes:
        logger.info(
            "%s: EXIF block of %s bytes is above the %s-byte limit; orientation not applied",
            shown,
            f"{len(block):,}",
            f"{limits.max_exif_bytes:,}",
        )
        return 1
    return read_orientation(block)


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return f"'{source}'"
    if isinstance(source, Image.Image):
        return "the image"
    file_name = getattr(source, "name", None)
    return f"'{file_name}'" if isinstance(file_name, str) else "the uploaded file"


def _unidentified_message(source: ImageSource, shown: str) -> str:
    """Why a file is refused: what its first bytes say it is, when we can tell, and what to send instead."""
    prefix = b""
    try:
        if isinstance(source, (str, Path)):
            with open(source, "rb") as handle:
                prefix = handle.read(16)
        elif hasattr(source, "seek"):
            source.seek(0)
            prefix = source.read(16)
    except OSError:
        pass
    kind = next((label for magic, label in _KNOWN_REFUSED if prefix.lstrip().startswith(magic)), None)
    if kind is None and prefix[:1] == b"P" and prefix[1:2] in b"1234567" and prefix[1:2]:
        kind = "PPM/PGM"
    if kind is None and prefix[:1] == b"\x0a" and prefix[1:2] in b"\x00\x02\x03\x04\x05":
        kind = "PCX"
    readable = f"{shown} is not an image PIL can read as {FORMAT_NAMES}"
    if kind is None:
        return f"{readable}; send one of those formats."
    return f"{readable}: its content is {kind}, whatever its name says; convert it to one of those formats."


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode != "RGB":
        return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images: stretch their actual range to 0..255 (a plain convert would clip to white).

    Done with Pillow's point() on 32-bit pixels, so the peak is one extra 4-byte copy, not float64 arrays.
    """
    if image.mode != "F":
        image = image.convert("I")
    low, high = image.getextrema()
    scale = 255.0 / (high - low) if high > low else 0.0
    offset = -low * scale
    return image.point(lambda value: value * scale + offset).convert("L")
