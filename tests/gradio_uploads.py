"""Test files placed where Gradio keeps uploads, for tests that call tab handlers without a server.

The app reads only files inside Gradio's upload cache (`demo.ui.uploaded_path`), so a test that hands a
handler a file does what the server does on an upload: copy it into that folder first. Each test process
uses its own subfolder, removed when the process exits.
"""

from __future__ import annotations

import atexit
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from demo.ui import upload_folder

_ROOT: list[Path] = []


def upload_copy(path: str | Path) -> str:
    """`path` copied into Gradio's upload cache; the copy's path, as a `gr.File` input gives it."""
    if not _ROOT:
        _ROOT.append(upload_folder() / f"studio-tests-{os.getpid()}")
        atexit.register(shutil.rmtree, _ROOT[0], ignore_errors=True)
    folder = _ROOT[0] / uuid.uuid4().hex
    folder.mkdir(parents=True)
    return str(shutil.copy(path, folder / Path(path).name))


def as_upload(path: str | Path) -> dict[str, Any]:
    """`path` copied into the upload cache, as the file dict an image input gives with `preprocess=False`."""
    return {"path": upload_copy(path), "orig_name": Path(path).name, "meta": {"_type": "gradio.FileData"}}
