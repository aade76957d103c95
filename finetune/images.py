"""Opening images: the one place that turns a file, bytes or an upload into a clean RGB `PIL.Image`.

Training, evaluation, prediction and the app all open images here, so every path honours EXIF orientation,
flattens transparency the same way, converts any mode (palette, 16-bit, CMYK, grayscale) to RGB, refuses
decompression bombs and reports a bad file as an `ImageError` rather than a traceback.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from finetune.errors import ImageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 64_000_000  # about 8000x8000; larger files are refused as likely decompression bombs
_BACKGROUND = (255, 255, 255)  # transparent pixels become white, as most viewers show them

ImageSource = str | Path | bytes | BinaryIO | Image.Image


def is_image_file(path: Path) -> bool:
    """True when the file name has one of the image extensions we accept (case-insensitive)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


def open_image(source: ImageSource, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Open `source` as an RGB image, EXIF-transposed, with transparency flattened onto white.

    `draft_size` lets JPEG decoding skip detail that a later resize would throw away (PIL's `Image.draft`
    decodes at 1/2, 1/4 or 1/8 scale, never below the size asked for), which makes large photos several times
    cheaper to open.
    """
    name = _describe(source)
    if isinstance(source, Image.Image):
        return _to_rgb(_first_frame(source), name)
    if isinstance(source, bytes):
        if not source:
            raise ImageError(f"{name} is empty (0 bytes); upload a JPEG, PNG, WebP, BMP, GIF or TIFF image.")
        source = io.BytesIO(source)
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name} does not exist or is not a file.")
        if path.stat().st_size == 0:
            raise ImageError(f"{name} is empty (0 bytes); it is not an image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_pixels(image, name)
                if draft_size is not None and image.format == "JPEG":
                    image.draft("RGB", draft_size)
                image.load()
                return _to_rgb(_first_frame(image), name)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageError(f"{name} is too large to open safely ({error}).") from error
    except UnidentifiedImageError as error:
        raise ImageError(
            f"{name} is not an image PIL can read; use JPEG, PNG, WebP, BMP, GIF or TIFF."
        ) from error
    except (OSError, ValueError, SyntaxError, EOFError) as error:
        raise ImageError(f"{name} could not be decoded (truncated or corrupt?): {error}") from error


def _describe(source: ImageSource) -> str:
    if isinstance(source, (str, Path)):
        return f"'{source}'"
    if isinstance(source, Image.Image):
        return "the image"
    return getattr(source, "name", None) or "the uploaded file"


def _check_pixels(image: Image.Image, name: str) -> None:
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageError(f"{name} has no pixels ({width}x{height}).")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name} is {width}x{height} pixels, more than the limit of {MAX_IMAGE_PIXELS:,}; "
            "resize it before uploading."
        )


def _first_frame(image: Image.Image) -> Image.Image:
    """Animated GIF/WebP/TIFF stacks: classify the first frame, which is what thumbnails show."""
    if getattr(image, "n_frames", 1) > 1:
        image.seek(0)
    return image


def _to_rgb(image: Image.Image, name: str) -> Image.Image:
    _check_pixels(image, name)
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _scale_to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, _BACKGROUND)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode != "RGB":
        image = image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    return image


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit and float images: stretch their actual range to 0..255 (a plain convert would clip to white)."""
    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scale = 255.0 / (high - low) if high > low else 0.0
    return Image.fromarray(((array - low) * scale).clip(0, 255).astype(np.uint8), mode="L")
