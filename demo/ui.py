"""The Gradio boundary all tabs share: what visitors send is checked here, and what they see is cleaned here.

Every input crosses this one trust boundary before any work starts:
- Image and file inputs are accepted only when Gradio vouched for them: a file in Gradio's own upload
  cache (`uploaded_path`, `uploaded_paths`, `image_source`), or an image sent inline as a `data:` URL.
  Image inputs are wired with `preprocess=False` (so a bad file gets our clear message instead of Gradio's
  generic one), which also means Gradio hands the handler the raw payload, including any `url` or `path` a
  caller typed. Anything that is not an upload gets `NOT_AN_UPLOAD`, the same words whether or not the
  named file exists, so the answer never tells which server paths exist.
- Numbers and text are checked against the same ranges as their components (`check_number`,
  `check_text`): sliders do not bound what an API caller sends.
- `user_errors` turns a `StudioError` into the modal Gradio shows, without a server traceback, and
  `public_message` takes server paths out of any text a visitor sees; the operator's log keeps the detail.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.utils import get_upload_folder
from PIL import Image

from finetune.errors import ConfigError, ImageError, StudioError
from finetune.images import ImageSource
from finetune.safe_text import escape_html

logger = logging.getLogger(__name__)

MAX_DATA_URL_BYTES = 20 * 1024 * 1024  # images sent inline (base64) obey the same limit as uploads
NOT_AN_UPLOAD = (
    "this app only reads files uploaded to it; upload the file again "
    "(from Python: gradio_client.handle_file)."
)
LOGGED_CHARS = 200  # a refused input is logged this far, so a 10 MB string cannot flood the log
# An absolute path: a "/" that does not continue a word, URL or relative path, then path characters.
_PATH = re.compile(r"(?<![\w.:/~\-])/[^\s'\"`<>|;,()\[\]{}]+|\b[A-Za-z]:\\[^\s'\"`<>|;,()]+")


@contextmanager
def user_errors() -> Iterator[None]:
    """Show a `StudioError` raised inside as a Gradio error modal (also usable as a decorator).

    The log keeps the whole message; the visitor sees it without server paths.
    """
    try:
        yield
    except StudioError as error:
        logger.info("Refused a request: %s", error)
        # Gradio shows the message as (sanitized) HTML; a name in it must stay text (finetune.safe_text).
        raise gr.Error(escape_html(public_message(str(error)), quote=False), print_exception=False) from error


def public_message(text: str) -> str:
    """`text` with every absolute server path cut to its last part (`'/srv/data/runs/x'` -> `'…/x'`).

    Messages come from the engine and the services, which name paths for the operator; visitors must
    not learn the server's layout (or that it runs as root) from them.
    """

    def shorten(match: re.Match[str]) -> str:
        path = match.group(0)
        tail = path.rstrip(".")  # the end of a sentence is not part of the path
        name = re.split(r"[/\\]", tail.rstrip("/\\"))[-1]
        return f"…/{name}{path[len(tail) :]}" if name else "…/"

    return _PATH.sub(shorten, text)


def upload_folder() -> Path:
    """Gradio's upload cache (`GRADIO_TEMP_DIR`, else `<tmp>/gradio`), resolved as Gradio resolves it."""
    return Path(get_upload_folder()).resolve()


def uploaded_path(file: Any) -> Path:
    """The file of one upload, after checking that it is one: a regular file inside Gradio's upload cache.

    `file` is what a file input gives (a path string, or Gradio's file dict with a `path`); symlinks
    and `..` are resolved first, so nothing can point out of the cache.
    """
    raw = file.get("path") if isinstance(file, dict) else getattr(file, "path", file)
    if isinstance(raw, (str, Path)) and str(raw) and "\0" not in str(raw):
        path = Path(raw).resolve()
        if path.is_relative_to(upload_folder()) and path.is_file():
            return path
    logger.warning("Refused an input that is not an upload: %.*r", LOGGED_CHARS, file)
    raise ImageError(NOT_AN_UPLOAD)


def uploaded_paths(files: Any) -> list[Path]:
    """`uploaded_path` of every file of a multi-file input (None means no files)."""
    if files is None:
        return []
    if not isinstance(files, (list, tuple)):
        files = [files]
    return [uploaded_path(file) for file in files]


def image_source(payload: Any) -> tuple[ImageSource, str]:
    """The image an image input holds, and the name to call it in messages.

    `payload` is what an image input gives with `preprocess=False`: Gradio's file dict (a path in its
    upload cache plus the original name), a `data:` URL (images sent inline, as a string or as the
    dict's `url`), or a PIL image when Python code calls a handler. Everything else is `NOT_AN_UPLOAD`.
    """
    if isinstance(payload, Image.Image):
        return payload, "the image"
    if payload is None or payload == "" or payload == {}:
        raise ImageError("no image; upload a photo, paste one or take one with the webcam first.")
    if isinstance(payload, dict) and payload.get("path"):
        return str(uploaded_path(payload)), str(payload.get("orig_name") or "the uploaded image")
    inline = payload.get("url") if isinstance(payload, dict) else payload
    if isinstance(inline, str) and inline.startswith("data:"):
        return _decode_data_url(inline), "the pasted image"
    logger.warning("Refused an image input that is not an upload: %.*r", LOGGED_CHARS, payload)
    raise ImageError(NOT_AN_UPLOAD)


def check_number(name: str, value: Any, low: float, high: float, whole: bool = False) -> Any:
    """`value` if it is a number within [low, high] (a whole one when `whole`), else a `ConfigError`.

    API callers can send anything JSON holds (strings, `Infinity`, `NaN`, 1e308), so this refuses
    what a slider could never send, with the range the slider shows.
    """
    kind = "whole number" if whole else "number"
    expected = f"{name} must be a {kind} from {low:g} to {high:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:  # NaN
        raise ConfigError(f"{expected}, got {_shown(value)}.")
    if not low <= value <= high or (whole and value != int(value)):
        raise ConfigError(f"{expected}, got {_shown(value)}.")
    return int(value) if whole else float(value)


def check_text(name: str, value: Any, max_chars: int) -> str:
    """`value` as text of at most `max_chars` characters (None is ""), else a `ConfigError` that does
    not repeat it (it may be megabytes long)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be text, got a {type(value).__name__}.")
    if len(value) > max_chars:
        raise ConfigError(f"{name} is {len(value)} characters long; at most {max_chars} are accepted.")
    return value


def _shown(value: Any) -> str:
    """A refused value as a message names it: short values whole, long ones cut."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _decode_data_url(url: str) -> bytes:
    header, _, data = url.partition(",")
    if ";base64" not in header:
        raise ImageError("inline images must be base64 data URLs; send the image as a file instead.")
    if len(data) * 3 // 4 > MAX_DATA_URL_BYTES:
        raise ImageError(
            f"the inline image is larger than {MAX_DATA_URL_BYTES // 2**20} MB; send a smaller one."
        )
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as error:
        raise ImageError("the inline image is not valid base64; send the image as a file instead.") from error
    if not decoded:
        raise ImageError("the inline image is empty; send a photo.")
    return decoded
