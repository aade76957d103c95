"""The run's split, saved as `split.json`: which file went to train, val or test, with its content hash.

A split recomputed from the folder is only the same split while the folder is the same: one file added to a
class reshuffles that class, and images the model trained on land in validation (leakage). So the split is
made once, saved in the run folder, and read back by `--resume`, `finetune.evaluate` (on the run's own
dataset) and the INT8 check. Each file carries the SHA-256 of its bytes, so a changed dataset is detected,
named and refused (or, for checks, only its unchanged files are used), never silently mixed in.
Full hashing is cheap next to decoding: 3,000 JPEGs (72 MB, in the page cache) hash in 0.14-0.5 s on 2
shared cores and take ~4 s to decode, so no size+ends shortcut (which misses edits in the middle) is needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from finetune.checkpoint import write_json
from finetune.data import SUBSETS, DatasetSplit, Sample, scan_dataset
from finetune.errors import CheckpointError, DatasetError

logger = logging.getLogger(__name__)

SPLIT_FILE = "split.json"
SPLIT_VERSION = 1


@dataclass(frozen=True)
class RecordedFile:
    """One image of the run: path relative to the dataset folder (POSIX), class, subset and content hash."""

    path: str
    label: str
    subset: str  # "train" | "val" | "test"
    sha256: str


@dataclass
class SplitRecord:
    """The saved split of a run (the contents of split.json)."""

    data_dir: Path
    layout: str
    classes: list[str]
    files: list[RecordedFile]

    def samples(self, subset: str, only: set[str] | None = None) -> list[Sample]:
        """The subset's files as samples (absolute paths), optionally only those whose path is in `only`."""
        index = {name: i for i, name in enumerate(self.classes)}
        return [
            Sample(path=self.data_dir / f.path, target=index[f.label])
            for f in self.files
            if f.subset == subset and (only is None or f.path in only)
        ]

    def unchanged(self, samples: Sequence[Sample], workers: int | None = None) -> list[Sample]:
        """Those of `samples` (from `self.samples`) whose file still has its recorded bytes."""
        recorded = {self.data_dir / f.path: f.sha256 for f in self.files}
        digests = hash_files([sample.path for sample in samples], workers)
        return [s for s, digest in zip(samples, digests, strict=True) if digest == recorded.get(s.path)]

    def is_dataset(self, data_dir: Path) -> bool:
        """Whether `data_dir` is the folder this split was recorded in."""
        return Path(data_dir).resolve() == self.data_dir.resolve()

    def to_split(self) -> DatasetSplit:
        """The recorded split as the trainer uses it."""
        return DatasetSplit(
            classes=list(self.classes), train=self.samples("train"), val=self.samples("val"),
            has_val_folder="val" in self.layout.split("+"), test=self.samples("test"), layout=self.layout,
        )  # fmt: skip


@dataclass
class DatasetChanges:
    """How a dataset folder differs from a run's recorded split (relative paths)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    layout: tuple[str, str] | None = None  # (recorded, now) when the folder layout changed

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified or self.layout)

    def unchanged(self, record: SplitRecord) -> set[str]:
        """Recorded paths whose file is still there with the same bytes."""
        changed = set(self.removed) | set(self.modified)
        return {f.path for f in record.files} - changed

    def describe(self) -> str:
        """'1 file added (train/cat/x.jpg), 2 modified (...)' for messages."""
        parts = []
        for what, paths in (("added", self.added), ("removed", self.removed), ("modified", self.modified)):
            if paths:
                shown = ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")
                parts.append(f"{len(paths)} file(s) {what} ({shown})")
        if self.layout:
            parts.insert(0, f"the layout changed from {self.layout[0]} to {self.layout[1]}")
        return "; ".join(parts) or "no change"


def record_split(split: DatasetSplit, data_dir: Path, workers: int | None = None) -> SplitRecord:
    """Hash every file of `split` and describe it relative to `data_dir`."""
    data_dir = Path(os.path.abspath(data_dir))
    entries = [(sample, subset) for subset, samples in split.subsets().items() for sample in samples]
    digests = hash_files([sample.path for sample, _ in entries], workers)
    files = [
        RecordedFile(
            path=_relative(sample.path, data_dir),
            label=split.classes[sample.target],
            subset=subset,
            sha256=digest,
        )  # fmt: skip
        for (sample, subset), digest in zip(entries, digests, strict=True)
    ]
    return SplitRecord(data_dir=data_dir, layout=split.layout, classes=list(split.classes), files=files)


def write_split(run_dir: Path, record: SplitRecord) -> None:
    """split.json in the run folder (atomic)."""
    counts = {subset: sum(f.subset == subset for f in record.files) for subset in SUBSETS}
    write_json(
        Path(run_dir) / SPLIT_FILE,
        {
            "version": SPLIT_VERSION,
            "data_dir": str(record.data_dir),
            "layout": record.layout,
            "classes": record.classes,
            "hash": "sha256",
            "counts": counts,
            "files": [
                {"path": f.path, "class": f.label, "subset": f.subset, "sha256": f.sha256}
                for f in record.files
            ],
        },
    )


def read_split(run_dir: Path) -> SplitRecord | None:
    """The run's recorded split, or None for a run saved before splits were recorded (or with no folder)."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("version") != SPLIT_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {SPLIT_VERSION}")
        files = [RecordedFile(f["path"], f["class"], f["subset"], f["sha256"]) for f in data["files"]]
        record = SplitRecord(Path(data["data_dir"]), str(data["layout"]), list(data["classes"]), files)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); start a new run.") from error
    unknown = {f.label for f in files} - set(record.classes) or {f.subset for f in files} - set(SUBSETS)
    if unknown:
        raise CheckpointError(
            f"{path} names unknown classes or subsets {sorted(unknown)[:5]}; it is damaged."
        )
    return record


def compare_with_folder(
    record: SplitRecord, val_fraction: float = 0.2, seed: int = 0, workers: int | None = None
) -> DatasetChanges:
    """What changed in the dataset folder since `record` was made: files added, removed or modified.

    A missing or unreadable folder is a `DatasetError` (everything would be 'removed').
    """
    if not record.data_dir.is_dir():
        raise DatasetError(
            f"the run's dataset folder '{record.data_dir}' is gone; put it back where it was to continue."
        )
    now = scan_dataset(record.data_dir, val_fraction, seed)
    on_disk = {_relative(s.path, record.data_dir) for samples in now.subsets().values() for s in samples}
    recorded = {f.path: f for f in record.files}
    present = [f for f in record.files if f.path in on_disk]
    digests = hash_files([record.data_dir / f.path for f in present], workers)
    return DatasetChanges(
        added=sorted(on_disk - set(recorded)),
        removed=sorted(set(recorded) - on_disk),
        modified=sorted(f.path for f, digest in zip(present, digests, strict=True) if digest != f.sha256),
        layout=None if now.layout == record.layout else (record.layout, now.layout),
    )


def hash_files(paths: Sequence[Path], workers: int | None = None) -> list[str]:
    """SHA-256 of each file's bytes ('' when unreadable), in threads (hashlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
        return list(pool.map(_sha256, paths))


def warn_about_classes(classes: Sequence[str], train: Iterable[int], val: Iterable[int]) -> list[str]:
    """Warnings for classes macro averages cannot speak for: no validation image, or a single image."""
    train_counts, val_counts = _counts(train), _counts(val)
    warnings = []
    missing = [name for i, name in enumerate(classes) if not val_counts.get(i)]
    if missing:
        warnings.append(
            f"class(es) {', '.join(repr(n) for n in missing[:10])} have no validation image: their "
            "accuracy is unknown and macro averages leave them out; add images (or a val/ folder) for them."
        )
    single = [name for i, name in enumerate(classes) if train_counts.get(i, 0) + val_counts.get(i, 0) == 1]
    if single:
        warnings.append(
            f"class(es) {', '.join(repr(n) for n in single[:10])} have a single image; one example cannot "
            "teach a class or measure it; add more."
        )
    return warnings


def _counts(targets: Iterable[int]) -> dict[int, int]:
    counts: dict[int, int] = {}
    for target in targets:
        counts[int(target)] = counts.get(int(target), 0) + 1
    return counts


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()  # hashlib.file_digest would do this, but only from Python 3.11
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return ""
    return digest.hexdigest()


def _relative(path: Path, data_dir: Path) -> str:
    """Without resolving symlinks: a class folder may link elsewhere, and its files still belong here."""
    return Path(os.path.abspath(path)).relative_to(data_dir).as_posix()
