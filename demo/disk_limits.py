"""Size limits for what the app keeps on disk: its outputs and Gradio's upload cache, swept in the background.

Gradio's `delete_cache` removes files by age only, so a burst of uploads (20 MB each) can fill a Space's disk
within the hour it waits. A daemon thread sweeps every `SWEEP_INTERVAL_S`: the upload cache is kept within
$STUDIO_UPLOAD_CACHE_GB and each output folder (Batch CSVs, detection JSONs, run zips) within
$STUDIO_OUTPUTS_GB, oldest entries first, through the one helper `finetune.disk.prune_folder`. Entries
younger than `IN_USE_S` stay (a queued request may still read its upload), and so do Gradio's cached
example files, which the page shows for as long as the app runs.

The Hugging Face Hub cache (`hf-hub:` runs, pretrained weights the Train tab downloads) is pruned too, whole
repositories, least recently downloaded first, but only when $STUDIO_HUB_CACHE_GB is set or the app runs on a
Space: on a workstation that cache is shared with every other program, so it is not ours to empty. A
served model is already in memory; pruning its files only means a download at the next start.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

import gradio as gr
from huggingface_hub import constants

from demo import batch_tab, detect_tab, train_tab
from finetune.disk import limit_from_env, prune_folder

logger = logging.getLogger(__name__)

UPLOADS_ENV, UPLOADS_GB = "STUDIO_UPLOAD_CACHE_GB", 4.0  # Gradio's copies of uploads and of our outputs
OUTPUTS_ENV, OUTPUTS_GB = "STUDIO_OUTPUTS_GB", 1.0  # each of the app's own output folders
HUB_ENV, HUB_GB = "STUDIO_HUB_CACHE_GB", 20.0  # the Hub cache, when pruned at all (see above)
SWEEP_INTERVAL_S = 30.0
IN_USE_S = 120.0  # entries younger than this may belong to a request still waiting in the queue


def output_folders() -> list[Path]:
    """The folders the app writes downloads to before Gradio copies them into its cache."""
    return [batch_tab.OUTPUT_ROOT, detect_tab.DOWNLOAD_DIR, train_tab.DOWNLOAD_ROOT]


def sweep(demo: gr.Blocks) -> None:
    """Prune the upload cache and every output folder to their size limits once."""
    prune_folder(
        Path(demo.GRADIO_CACHE),
        max_bytes=limit_from_env(UPLOADS_ENV, UPLOADS_GB),
        keep_newer_than_s=IN_USE_S,
        protected=_example_entries(demo),
    )
    outputs_limit = limit_from_env(OUTPUTS_ENV, OUTPUTS_GB)
    for folder in output_folders():
        prune_folder(folder, max_bytes=outputs_limit, keep_newer_than_s=IN_USE_S)
    if os.environ.get(HUB_ENV) or os.environ.get("SPACE_ID"):
        hub = Path(constants.HF_HUB_CACHE)
        others = [path for path in _children(hub) if not path.name.startswith(("models--", "datasets--"))]
        prune_folder(
            hub, max_bytes=limit_from_env(HUB_ENV, HUB_GB), keep_newer_than_s=IN_USE_S, protected=others
        )


def start_sweeper(demo: gr.Blocks, interval_s: float = SWEEP_INTERVAL_S) -> threading.Thread:
    """Sweep every `interval_s` for as long as `demo` runs (call after `launch`); the thread is a daemon."""

    def run() -> None:
        while demo.is_running:
            time.sleep(interval_s)
            if not demo.is_running:
                return
            try:
                sweep(demo)
            except Exception:  # housekeeping must never take the server down; the log keeps the trace
                logger.exception("Disk sweep failed")

    thread = threading.Thread(target=run, name="disk-sweeper", daemon=True)
    thread.start()
    return thread


def _children(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def _example_entries(demo: gr.Blocks) -> set[Path]:
    """Cache entries (direct children of the upload cache) holding files Gradio keeps for examples."""
    cache = Path(demo.GRADIO_CACHE)
    kept: set[Path] = set()
    for component in demo.blocks.values():
        for file in getattr(component, "keep_in_cache", ()):
            path = Path(file)
            if path.is_relative_to(cache) and path != cache:
                kept.add(cache / path.relative_to(cache).parts[0])
    return kept
