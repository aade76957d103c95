"""The Gradio boundary all tabs share: uploads become image sources, `StudioError` becomes `gr.Error`.

`user_errors` is the one place where a user's mistake (a corrupt upload, an unknown class, a bad option)
turns into the modal Gradio shows, without a server traceback; anything else is a bug and keeps its
traceback in the server log. Image inputs are wired with `preprocess=False`, so Gradio never decodes an
upload itself (its decoder would fail on a bad file with a generic "Error"); `open_image` does it instead,
through the service, with a message that says what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from PIL import Image

from finetune.errors import ImageError, StudioError
from finetune.images import ImageSource
from finetune.safe_text import escape_html

logger = logging.getLogger(__name__)

MAX_DATA_URL_BYTES = 20 * 1024 * 1024  # images sent inline (base64) obey the same limit as uploads


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a `StudioError` raised inside as a Gradio error modal (also usable as a decorator)."""
    try:
        yield
    except StudioError as error:
        logger.info("Refused a request: %s", error)
        # Gradio shows the message as (sanitized) HTML; a name in it must stay text (finetune.safe_text).
        raise gr.Error(escape_html(str(error), quote=False), print_exception=False) from error


def image_source(payload: Any) -> tuple[ImageSource, str]:
    """The image an image input holds, and the name to call it in messages.

    `payload` is what an image input gives with `preprocess=False`: Gradio's file dict (a path in its
    upload cache plus the original name), a data URL (images sent inline by older clients), or a plain
    path or PIL image when a handler is called directly.
    """
    if isinstance(payload, Image.Image):
        return payload, "the image"
    if payload is None or payload == "":
        raise ImageError("no image; upload a photo, paste one or take one with the webcam first.")
    if isinstance(payload, dict):
        name = payload.get("orig_name") or "the uploaded image"
        if payload.get("path"):
            return str(payload["path"]), name
        payload = payload.get("url") or ""
    if isinstance(payload, str) and payload.startswith("data:"):
        return _decode_data_url(payload), "the pasted image"
    if isinstance(payload, (str, Path)):
        return str(payload), Path(payload).name
    raise ImageError(f"cannot read an image from a {type(payload).__name__}; send a file.")


def _decode_data_url(url: str) -> bytes:
    header, _, data = url.partition(",")
    if ";base64" not in header:
        raise ImageError("inline images must be base64 data URLs; send the image as a file instead.")
    if len(data) * 3 // 4 > MAX_DATA_URL_BYTES:
        raise ImageError(
            f"the inline image is larger than {MAX_DATA_URL_BYTES // 2**20} MB; send a smaller one."
        )
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError("the inline image is not valid base64; send the image as a file instead.") from error
