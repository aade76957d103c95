"""The decoded-image cache: every image opened once, resized, and stored as uint8 rows read batch by batch.

Decoding and resizing JPEGs dominates CPU training time when repeated every epoch, so each image is opened
once (through `finetune.images.open_image`), passed through the run's own eval resize/crop, and stored as
uint8 in a memory-mapped `.npy` file; epochs then gather each batch's rows from it. Unreadable files are
collected, never fatal.

Memory does not grow with the dataset: images are decoded straight into the memory-mapped file (never into
an array in RAM), and batches are gathered from it row by row, so the cache's pages are file pages the OS
can drop and read again rather than memory the process holds. An interrupted decode (Ctrl-C, cancel, the
time budget, a crash) keeps what it decoded: a progress file beside the partial `.npy` records which images
are done, and the next build with the same files continues from there. When the cache would not fit on the
disk, images are streamed from the files instead (`finetune.streamed`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from finetune.data import Sample
from finetune.errors import ImageError, StoppedError
from finetune.images import open_image
from finetune.streamed import DecodePool, StreamedPixels, cache_fits, check_files, decode_pool

logger = logging.getLogger(__name__)

PROGRESS_EVERY = 512  # images decoded between two saves of a cache build's progress
PENDING, DECODED, FAILED = b"-", b"o", b"x"  # one mark per image in the progress file


RELEASE_EVERY_BYTES = 64 * 2**20  # cache pages read (or written) between two releases


def release_pages(array: np.ndarray) -> None:
    """Unmap a memory-mapped cache's pages from this process; they stay in the OS page cache.

    Pages of a file mapping that a process has touched count in its resident set (RSS) until it unmaps them,
    so an epoch over a 9 GB cache at 224 px would show 9 GB of RSS although none of it is private memory.
    Dropping the mapping's pages now and then keeps RSS at what training needs, whatever the dataset size;
    a page read again comes back from the page cache (a minor fault), or from disk if the OS dropped it.
    Written pages must be flushed first (`flush()`), as the cache build does before each release.
    """
    mapping = getattr(array, "_mmap", None)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


class CachedPixels:
    """The good images of a cache, (N, 3, H, W) uint8, gathered batch by batch from the (memory-mapped) array.

    Indexing with a batch's indices (a tensor, array, slice or int) copies only those rows into a tensor, so
    a training run holds one batch of pixels, whatever the size of the dataset.
    """

    def __init__(self, array: np.ndarray, keep: np.ndarray, reads: list[int] | None = None) -> None:
        self._array = array  # every decoded slot, failed files included; `keep` picks the good rows
        self._keep = keep
        # bytes read since the last release, one counter shared by every view of this array (a probe sample,
        # a training subset): each view counting alone would let each hold its own share of mapped pages
        self._reads = reads if reads is not None else [0]

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self._keep), *self._array.shape[1:])

    def __len__(self) -> int:
        return len(self._keep)

    def __getitem__(self, index: torch.Tensor | np.ndarray | slice | int) -> torch.Tensor:
        if isinstance(index, torch.Tensor):
            index = index.numpy()
        rows = self._keep[index]
        if np.ndim(rows) == 0:
            return torch.from_numpy(np.array(self._array[int(rows)]))
        batch = self._array[np.asarray(rows, dtype=np.int64)]  # fancy indexing copies
        self._reads[0] += batch.nbytes
        if self._reads[0] >= RELEASE_EVERY_BYTES:
            self._reads[0] = 0
            release_pages(self._array)
        return torch.from_numpy(batch)

    def subset(self, indices: np.ndarray) -> CachedPixels:
        """A view of some of the rows (no pixel is copied)."""
        return CachedPixels(self._array, self._keep[indices], self._reads)


@dataclass
class CachedImages:
    """Decoded images (uint8 rows gathered on demand) plus their targets; files that failed are listed."""

    pixels: CachedPixels | StreamedPixels
    targets: torch.Tensor
    paths: list[Path]
    bad_files: list[tuple[Path, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def subset(self, indices: torch.Tensor) -> CachedImages:
        """The images at `indices`, sharing this cache's pixels (bad files stay with the whole set)."""
        rows = indices.numpy()
        return CachedImages(self.pixels.subset(rows), self.targets[indices], [self.paths[i] for i in rows])


def build_cache(
    samples: Sequence[Sample],
    geometric_transform: Callable[[Image.Image], Image.Image],
    image_size: int,
    cache_path: Path | None = None,
    workers: int | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    draft_size: tuple[int, int] | None = None,
    should_stop: Callable[[], bool] | None = None,
    max_gb: float = 0.0,
) -> CachedImages:
    """Decode, resize and crop every image once; return uint8 pixels of the good ones.

    With `cache_path`, pixels are decoded straight into a memory-mapped `.npy` (no RAM per image), and a
    finished cache is reused by a resumed run or by other processes on the node; a sidecar lists which files
    failed. Progress is saved every `PROGRESS_EVERY` images, so an interrupted build continues where it
    stopped. `should_stop` is asked before each image; once it says yes, what was decoded is saved and
    `StoppedError` is raised. Without `cache_path` (tests, small sets) the pixels stay in RAM.

    When the cache would not fit on the disk (or exceed `max_gb`), nothing is cached: every file is checked
    once, and batches are decoded from the files by worker processes (`finetune.streamed`).
    """
    key = _cache_key(samples, image_size)
    count = len(samples)
    shape = (count, 3, image_size, image_size)
    pool = decode_pool(geometric_transform, image_size, draft_size, workers)
    if cache_path is not None:
        cached = _read_cache(cache_path, key, samples, pool)
        if cached is not None:
            return cached
        if not cache_fits(cache_path.parent, int(np.prod(shape)), max_gb):
            return _stream(samples, pool, cache_path, key, on_progress, should_stop, max_gb)
    if cache_path is None:
        pixels: np.ndarray = np.zeros(shape, dtype=np.uint8)
        state, errors = bytearray(PENDING * count), {}
    else:
        pixels, state, errors = _open_partial(cache_path, key, shape)
    todo = [index for index in range(count) if state[index] == PENDING[0]]
    done = count - len(todo)
    if done and on_progress is not None:
        on_progress(done, count)

    def decode(index: int) -> None:
        if should_stop is not None and should_stop():
            return
        try:
            image = geometric_transform(open_image(samples[index].path, draft_size=draft_size))
            array = np.asarray(image, dtype=np.uint8)
            if array.shape[:2] != (image_size, image_size):
                raise ImageError(f"resized to {array.shape[:2]}, expected {image_size}")
            pixels[index] = array.transpose(2, 0, 1)
            state[index] = DECODED[0]
        except ImageError as error:
            errors[index] = str(error)
            state[index] = FAILED[0]

    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        for start in range(0, len(todo), PROGRESS_EVERY):
            for _ in pool.map(decode, todo[start : start + PROGRESS_EVERY]):
                done += 1
                if on_progress is not None:
                    on_progress(done, count)
            if cache_path is not None:
                _save_progress(cache_path, key, pixels, state, errors)
            if should_stop is not None and should_stop():
                kept = sum(1 for mark in state if mark != PENDING[0])
                raise StoppedError(
                    f"stopped while decoding the images; {kept} of {count} are decoded and kept, and the "
                    "next run on the same files continues from there."
                    if cache_path is not None
                    else "stopped while decoding the images; nothing was saved."
                )
    ok = np.frombuffer(bytes(state), dtype=np.uint8) == DECODED[0]
    if cache_path is None:
        return _as_cached(samples, pixels, ok, errors)
    _finish_cache(cache_path, key, pixels, ok, errors)
    return _as_cached(samples, np.load(cache_path, mmap_mode="r"), ok, errors)


def _cache_key(samples: Sequence[Sample], image_size: int) -> str:
    digest = hashlib.sha256(str(image_size).encode())
    for sample in samples:
        stat = sample.path.stat() if sample.path.exists() else None
        digest.update(f"{sample.path}|{sample.target}|{stat.st_size if stat else -1}|".encode())
        digest.update(f"{stat.st_mtime_ns if stat else -1}\n".encode())
    return digest.hexdigest()[:16]


def _read_cache(
    cache_path: Path, key: str, samples: Sequence[Sample], pool: DecodePool
) -> CachedImages | None:
    """A finished cache of the same files, or the recorded verdicts of a streamed set."""
    meta_path = cache_path.with_suffix(".json")
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            return None
        ok = np.array(meta["ok"], dtype=bool)
        errors = {int(k): v for k, v in meta["errors"].items()}
        if meta.get("streamed"):
            logger.info("Streaming the images checked before (%s)", meta_path)
            return _as_streamed(samples, pool, ok, errors)
        pixels = np.load(cache_path, mmap_mode="r")
    except (ValueError, OSError, json.JSONDecodeError, KeyError):
        return None
    logger.info("Reusing decoded image cache %s", cache_path)
    return _as_cached(samples, pixels, ok, errors)


def _stream(
    samples: Sequence[Sample],
    pool: DecodePool,
    cache_path: Path,
    key: str,
    on_progress: Callable[[int, int], None] | None,
    should_stop: Callable[[], bool] | None,
    max_gb: float,
) -> CachedImages:
    """Check every file once and record the verdicts beside where the cache would be; pixels stream."""
    from finetune.checkpoint import write_json

    need_gb = len(samples) * 3 * pool.image_size**2 / 2**30
    where = f"--cache-max-gb {max_gb:g}" if max_gb > 0 else f"the free disk at {cache_path.parent}"
    logger.warning(
        "A decoded cache of %d images would take %.1f GB, more than %s allows: decoding each batch from "
        "the files instead (slower epochs, same memory).", len(samples), need_gb, where,
    )  # fmt: skip
    errors = check_files([sample.path for sample in samples], pool, on_progress, should_stop)
    ok = np.array([index not in errors for index in range(len(samples))], dtype=bool)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(cache_path.with_suffix(".json"), {"key": key, "ok": ok.tolist(), "errors": errors,
                                                 "streamed": True})  # fmt: skip
    return _as_streamed(samples, pool, ok, errors)


def _as_streamed(
    samples: Sequence[Sample], pool: DecodePool, ok: np.ndarray, errors: dict[int, str]
) -> CachedImages:
    keep = np.flatnonzero(ok)
    return CachedImages(
        pixels=StreamedPixels([samples[i].path for i in keep], pool, pool.image_size),
        targets=torch.tensor([samples[i].target for i in keep], dtype=torch.long),
        paths=[samples[i].path for i in keep],
        bad_files=[(samples[i].path, errors.get(i, "unreadable")) for i in np.flatnonzero(~ok)],
    )


def _partial_paths(cache_path: Path) -> tuple[Path, Path]:
    """The `.npy` being filled and its progress file (key, one mark per image, errors so far)."""
    return cache_path.with_suffix(".partial.npy"), cache_path.with_suffix(".progress.json")


def _open_partial(
    cache_path: Path, key: str, shape: tuple[int, ...]
) -> tuple[np.ndarray, bytearray, dict[int, str]]:
    """The memory-mapped array of an unfinished build with the same key, or a new one (sparse on disk).

    The progress file is only written after the pixels it marks done were flushed, so a mark always means
    the pixels are on disk; a different key (files added, removed or changed) starts over.
    """
    partial, progress = _partial_paths(cache_path)
    try:
        record = json.loads(progress.read_text())
        if record.get("key") == key and len(record["state"]) == shape[0] and partial.is_file():
            pixels = np.load(partial, mmap_mode="r+")
            if pixels.shape == shape and pixels.dtype == np.uint8:
                state = bytearray(record["state"].encode("ascii"))
                logger.info(
                    "Resuming the decoded image cache %s: %d of %d images already done",
                    cache_path, sum(1 for mark in state if mark != PENDING[0]), shape[0],
                )  # fmt: skip
                return pixels, state, {int(k): v for k, v in record["errors"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no usable progress: start over
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    for stale in (cache_path, cache_path.with_suffix(".json"), progress):
        stale.unlink(missing_ok=True)  # a finished cache of other files must not meet this build's key
    pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
    return pixels, bytearray(PENDING * shape[0]), {}


def _save_progress(
    cache_path: Path, key: str, pixels: np.ndarray, state: bytearray, errors: dict[int, str]
) -> None:
    from finetune.checkpoint import write_json

    pixels.flush()  # pixels first: the marks written next must never claim pixels still in memory
    record = {"key": key, "state": bytes(state).decode("ascii"), "errors": dict(errors)}
    write_json(_partial_paths(cache_path)[1], record)
    release_pages(pixels)  # flushed: the decoded pages need not stay in this process's RSS


def _finish_cache(
    cache_path: Path, key: str, pixels: np.ndarray, ok: np.ndarray, errors: dict[int, str]
) -> None:
    """Metadata first, then the rename: a `.npy` with its `.json` is always a complete cache."""
    from finetune.checkpoint import write_json

    partial, progress = _partial_paths(cache_path)
    pixels.flush()
    write_json(cache_path.with_suffix(".json"), {"key": key, "ok": ok.tolist(), "errors": errors})
    os.replace(partial, cache_path)
    progress.unlink(missing_ok=True)


def _as_cached(
    samples: Sequence[Sample], pixels: np.ndarray, ok: np.ndarray, errors: dict[int, str]
) -> CachedImages:
    keep = np.flatnonzero(ok)
    return CachedImages(
        pixels=CachedPixels(pixels, keep),
        targets=torch.tensor([samples[i].target for i in keep], dtype=torch.long),
        paths=[samples[i].path for i in keep],
        bad_files=[(samples[i].path, errors.get(i, "unreadable")) for i in np.flatnonzero(~ok)],
    )
