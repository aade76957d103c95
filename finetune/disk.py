"""Bounded folders: the one helper that deletes the oldest entries of a folder until it fits a size limit.

Caches and outputs that grow with every visitor (the ONNX export cache, the app's CSV/JSON/zip outputs,
Gradio's upload cache) all call `prune_folder`, so they share one rule: entries (the folder's direct
children, files or whole sub-folders) go oldest first, by their newest modification time, until the folder
holds at most `max_bytes`; entries older than `max_age_s` go whatever the size. Entries younger than
`keep_newer_than_s` are never deleted, because a request may still be reading them.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from finetune.errors import ConfigError

logger = logging.getLogger(__name__)

GB = 1024**3


@dataclass
class PruneReport:
    """What `prune_folder` found and did: bytes before and after, and the entries it deleted."""

    bytes_before: int = 0
    bytes_after: int = 0
    removed: list[Path] = field(default_factory=list)


@dataclass(frozen=True)
class _Entry:
    path: Path
    size: int
    mtime: float


def limit_from_env(name: str, default_gb: float) -> int:
    """A size limit in bytes from env `name` (in GB, fractions allowed), else `default_gb`."""
    text = os.environ.get(name, "").strip()
    if not text:
        return int(default_gb * GB)
    try:
        value = float(text)
    except ValueError as error:
        raise ConfigError(f"{name}={text!r} is not a number of GB; set it to e.g. 2 or 0.5.") from error
    if not value > 0:
        raise ConfigError(f"{name}={text!r} must be a positive number of GB.")
    return int(value * GB)


def prune_folder(
    folder: Path,
    max_bytes: int | None = None,
    max_age_s: float | None = None,
    keep_newer_than_s: float = 0.0,
    max_entries: int | None = None,
    protected: Collection[Path] = (),
) -> PruneReport:
    """Delete `folder`'s oldest entries until it holds at most `max_bytes` and `max_entries` entries, and
    none older than `max_age_s`; `protected` entries (paths of direct children) always stay.

    A folder that does not exist is empty. Entries that vanish or cannot be deleted meanwhile (another
    process pruned them, a file still open on some systems) are skipped, never an error: pruning is
    housekeeping and must not fail the request that triggered it.
    """
    report = PruneReport()
    keep = {Path(path) for path in protected}
    entries = sorted(_entries(Path(folder)), key=lambda entry: entry.mtime)
    total = report.bytes_before = sum(entry.size for entry in entries)
    count, now = len(entries), time.time()
    for entry in entries:
        is_expired = max_age_s is not None and now - entry.mtime > max_age_s
        is_over = (max_bytes is not None and total > max_bytes) or (
            max_entries is not None and count > max_entries
        )
        if not (is_expired or is_over) or entry.path in keep or now - entry.mtime < keep_newer_than_s:
            continue
        if _remove(entry.path):
            total -= entry.size
            count -= 1
            report.removed.append(entry.path)
    report.bytes_after = total
    if report.removed:
        logger.info(
            "Pruned %d entries of %s (%.1f -> %.1f MB)",
            len(report.removed),
            folder,
            report.bytes_before / 2**20,
            total / 2**20,
        )
    if max_bytes is not None and total > max_bytes:
        logger.warning("%s holds %.1f MB, above its %.1f MB limit", folder, total / 2**20, max_bytes / 2**20)
    return report


def folder_bytes(folder: Path) -> int:
    """Bytes held by the files under `folder` (0 when it does not exist)."""
    return sum(entry.size for entry in _entries(Path(folder)))


def _entries(folder: Path) -> list[_Entry]:
    try:
        children = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    entries = []
    for child in children:
        try:
            entries.append(_measure(child))
        except FileNotFoundError:
            continue
    return entries


def _measure(path: Path) -> _Entry:
    """Size and newest mtime of a file, or of a folder and everything under it (links are not followed)."""
    stat = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return _Entry(path, stat.st_size, stat.st_mtime)
    size, mtime = 0, stat.st_mtime
    for root, _, files in os.walk(path):
        for name in files:
            try:
                child = os.lstat(os.path.join(root, name))
            except FileNotFoundError:
                continue
            size += child.st_size
            mtime = max(mtime, child.st_mtime)
    return _Entry(path, size, mtime)


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return True  # someone else removed it: its bytes are gone either way
    except OSError as error:
        logger.warning("Could not prune %s: %s", path, error)
        return False
    return True
