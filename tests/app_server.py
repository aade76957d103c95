"""Start the real app on 127.0.0.1 for a test, like gradio's own `connect()` helper: launch, yield, close."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import app
from demo.service import InferenceService
from demo.vision_tasks import VisionService


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve(
    service: InferenceService, vision: VisionService | None = None, **launch_options: Any
) -> Iterator[str]:
    """The app built by `app.build_app` (with the Detect and Segment tabs when `vision` is given), launched
    by `app.launch` on 127.0.0.1; yields its URL."""
    demo = app.build_app(service, vision)
    app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, **launch_options)
    try:
        yield demo.local_url
    finally:
        demo.close()
