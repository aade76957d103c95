"""Start the real app on 127.0.0.1 for a test, like gradio's own `connect()` helper: launch, yield, close."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr

import app
from demo.service import InferenceService
from demo.training_jobs import TrainingManager
from demo.vision_tasks import VisionService


def free_port() -> int:
    """A port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def launched(
    service: InferenceService,
    vision: VisionService | None = None,
    trainer: TrainingManager | None = None,
    **launch_options: Any,
) -> Iterator[gr.Blocks]:
    """The app built by `app.build_app` (Detect/Segment with `vision`, the Train tab with `trainer`), launched
    by `app.launch` on 127.0.0.1; yields the running `gr.Blocks` (its `local_url`, `fns`) and closes it.
    The caller still owns (and closes) the service and the trainer."""
    demo = app.build_app(service, vision, trainer)
    app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True, **launch_options)
    try:
        yield demo
    finally:
        demo.close()


@contextmanager
def serve(
    service: InferenceService, vision: VisionService | None = None, **launch_options: Any
) -> Iterator[str]:
    """`launched`, yielding only the app's URL."""
    with launched(service, vision, **launch_options) as demo:
        yield demo.local_url


@contextmanager
def studio_with_training(data_dir: Path) -> Iterator[tuple[str, TrainingManager]]:
    """The whole app (embedded model, Train and Teach tabs) on 127.0.0.1 with runs kept in `data_dir`:
    (its URL, its training manager), closed afterwards. For browser tests that train."""
    from demo.train_tab import serve_trained_runs

    service = InferenceService.from_checkpoint(None)
    manager = TrainingManager(data_dir)
    serve_trained_runs(manager, service)
    demo = app.build_app(service, trainer=manager)
    app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
    try:
        yield demo.local_url, manager
    finally:
        demo.close()
        manager.close()
        service.close()
