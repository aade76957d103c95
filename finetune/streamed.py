"""Images decoded batch by batch by worker processes, for datasets whose decoded cache does not fit on disk.

The decoded-image cache (`finetune.pixel_cache.build_cache`) costs N x 3 x S x S bytes of disk: 10 GB for
70,000 images at 224 px. When that is more than the disk has free (or more than `--cache-max-gb`), training
reads `StreamedPixels` instead: the same interface as the memory-mapped `CachedPixels`, but each batch is
decoded from the image files when it is asked for, on a pool of worker processes (Pillow's decoders and
resizes run in parallel there, whatever the GIL does in the training process). Memory stays one batch of
pixels; the price is decoding every image again each epoch.

Unreadable files are found once, by a checking pass that decodes every image (as the cache would) and keeps
nothing but the verdicts, so training never meets a bad file mid-epoch.
"""

from __future__ import annotations

import logging
import os
import shutil
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune.errors import ImageError, StoppedError
from finetune.images import open_image

logger = logging.getLogger(__name__)

DISK_MARGIN = 0.9  # share of the free disk a cache may take: leave room for checkpoints and the system
Transform = Callable[[Image.Image], Image.Image]


def cache_fits(folder: Path, nbytes: int, max_gb: float = 0.0) -> bool:
    """Whether a cache of `nbytes` fits: under `max_gb` when given, else DISK_MARGIN of the free disk."""
    if max_gb > 0:
        return nbytes <= max_gb * 2**30
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent  # the cache folder may not exist yet: ask its nearest existing parent
    return nbytes <= DISK_MARGIN * shutil.disk_usage(existing).free


_worker: dict[str, Any] = {}


def _init_worker(transform: Transform, image_size: int, draft_size: tuple[int, int] | None) -> None:
    torch.set_num_threads(
        1
    )  # the pool's processes decode; one thread each keeps them off the trainer's cores
    _worker.update(transform=transform, image_size=image_size, draft_size=draft_size)


def decode_pixels(path: Path) -> np.ndarray | str:
    """(3, S, S) uint8 pixels of one file as the cache would store them, or why it cannot be read."""
    try:
        image = _worker["transform"](open_image(path, draft_size=_worker["draft_size"]))
        array = np.asarray(image, dtype=np.uint8)
        size = _worker["image_size"]
        if array.shape[:2] != (size, size):
            raise ImageError(f"resized to {array.shape[:2]}, expected {size}")
        return np.ascontiguousarray(array.transpose(2, 0, 1))
    except ImageError as error:
        return str(error)


class StreamedPixels:
    """Rows of a dataset decoded on demand, indexed like `CachedPixels` (a batch's indices -> a tensor)."""

    def __init__(self, paths: Sequence[Path], pool: DecodePool, image_size: int) -> None:
        self._paths = list(paths)
        self._pool = pool
        self._size = image_size

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._paths), 3, self._size, self._size)

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, index: torch.Tensor | np.ndarray | slice | int) -> torch.Tensor:
        rows = np.arange(len(self._paths))[index.numpy() if isinstance(index, torch.Tensor) else index]
        if np.ndim(rows) == 0:
            return self[np.array([int(rows)])][0]
        decoded = self._pool.map([self._paths[int(i)] for i in rows])
        failed = [
            (self._paths[int(i)], row) for i, row in zip(rows, decoded, strict=True) if isinstance(row, str)
        ]
        if failed:  # the checking pass read it: the file changed during training
            path, why = failed[0]
            raise ImageError(f"'{path}' became unreadable during training ({why}); restore it and resume.")
        return torch.from_numpy(np.stack(decoded))

    def subset(self, indices: np.ndarray) -> StreamedPixels:
        return StreamedPixels([self._paths[int(i)] for i in indices], self._pool, self._size)


class DecodePool:
    """Worker processes that decode files with the run's transform; started on first use, one per core."""

    def __init__(
        self, transform: Transform, image_size: int, draft_size: tuple[int, int] | None, workers: int | None
    ) -> None:
        self._args = (transform, image_size, draft_size)
        self.image_size = image_size
        self._workers = workers or os.cpu_count() or 1
        self._executor: ProcessPoolExecutor | None = None

    def map(self, paths: Sequence[Path]) -> list[np.ndarray | str]:
        if self._executor is None:
            # spawn: a forked copy of a process running torch threads can deadlock
            self._executor = ProcessPoolExecutor(
                self._workers, mp_context=get_context("spawn"), initializer=_init_worker, initargs=self._args
            )
            # the workers end with the last dataset that uses them (the run), not with the interpreter
            weakref.finalize(self, self._executor.shutdown, wait=False, cancel_futures=True)
        chunk = max(1, len(paths) // (4 * self._workers))
        return list(self._executor.map(decode_pixels, paths, chunksize=chunk))

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(cancel_futures=True)
            self._executor = None


_pools: weakref.WeakValueDictionary[tuple, DecodePool] = weakref.WeakValueDictionary()


def decode_pool(
    transform: Transform, image_size: int, draft_size: tuple[int, int] | None, workers: int | None
) -> DecodePool:
    """One pool per transform and size: a run's train, val and test sets share its worker processes."""
    key = (id(transform), image_size, draft_size, workers)
    pool = _pools.get(key)
    if pool is None or pool._args[0] is not transform:
        pool = DecodePool(transform, image_size, draft_size, workers)
        _pools[key] = pool
    return pool


def check_files(
    paths: Sequence[Path],
    pool: DecodePool,
    on_progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    chunk: int = 256,
) -> dict[int, str]:
    """Decode every file once, keeping only which failed and why ({index: reason})."""
    errors: dict[int, str] = {}
    for start in range(0, len(paths), chunk):
        if should_stop is not None and should_stop():
            raise StoppedError("stopped while checking the images; nothing was saved.")
        for offset, row in enumerate(pool.map(paths[start : start + chunk])):
            if isinstance(row, str):
                errors[start + offset] = row
        if on_progress is not None:
            on_progress(min(start + chunk, len(paths)), len(paths))
    return errors
