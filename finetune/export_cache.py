"""Where ONNX exports live: beside a writable run, else in a size-limited cache of recently used exports.

`finetune.export` writes and checks the files; this module only decides their places and keeps the cache
within $STUDIO_ONNX_CACHE_GB, least recently used first.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from finetune.checkpoint import LoadedRun
from finetune.disk import limit_from_env, prune_folder

ONNX_FILE = "model.onnx"
CACHE_ENV = "STUDIO_CACHE_DIR"
CACHE_LIMIT_ENV = "STUDIO_ONNX_CACHE_GB"
CACHE_LIMIT_GB = 2.0  # the export cache keeps its most recently used exports within this size (~20 MB each)


def cache_root() -> Path:
    """Where exports of read-only or folder-less runs go: $STUDIO_CACHE_DIR, else the user's cache folder."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "image-recognition-studio"


def onnx_locations(run: LoadedRun, fingerprint: str, name: str = ONNX_FILE) -> tuple[list[Path], Path]:
    """(places to look for a matching export named `name`, in order; the place to write a new one).

    A run folder's own export is used only where we would have written it ourselves (a writable folder
    outside the Hugging Face cache). A `model.onnx` that came down with an `hf-hub:` run, or sits in a
    read-only folder, was made by someone else: its fingerprint is a metadata string anyone can copy, and a
    parity check on a few photos cannot rule out a graph that differs elsewhere. Such runs are exported
    again into the cache and checked against PyTorch like any local export, so Classify serves the same
    weights that Explain uses.
    """
    cached = cache_root() / "onnx" / f"{run.architecture}-{fingerprint[:16]}" / name
    if run.run_dir is None or not is_writable_run_dir(Path(run.run_dir)):
        return [cached], cached
    return [Path(run.run_dir) / name, cached], Path(run.run_dir) / name


def prune_export_cache() -> None:
    """Keep the export cache within $STUDIO_ONNX_CACHE_GB (default 2), least recently used exports first.

    A running server keeps its ONNX sessions in memory, so deleting a file it loaded costs only a new
    export the next time that run starts; the export written a moment ago is always kept.
    """
    prune_folder(
        cache_root() / "onnx", max_bytes=limit_from_env(CACHE_LIMIT_ENV, CACHE_LIMIT_GB), keep_newer_than_s=60
    )


def mark_used(path: Path) -> None:
    """Touch a cached export when it is served, so pruning removes the least recently used ones first."""
    if path.is_relative_to(cache_root()):
        with contextlib.suppress(OSError):
            os.utime(path)


def prune_if_cached(target: Path) -> None:
    """Prune the export cache after writing `target` into it (an export in a run folder is the run's)."""
    if target.is_relative_to(cache_root()):
        prune_export_cache()


def is_writable_run_dir(run_dir: Path) -> bool:
    """False for read-only folders and for the Hugging Face cache, whose snapshots must stay as downloaded."""
    if not os.access(run_dir, os.W_OK):
        return False
    try:
        from huggingface_hub import constants

        return not run_dir.resolve().is_relative_to(Path(constants.HF_HUB_CACHE).resolve())
    except ImportError:
        return True
