"""Multi-label datasets: a `path,labels` CSV read, checked, split (stratified as far as it goes) and recorded.

`python -m finetune labels.csv --out RUN` trains a multi-label model from a CSV with a header line and two
columns: `path` (relative to the CSV's folder) and `labels` (zero or more names separated by spaces or
semicolons; an empty cell is a negative, an image showing none of the labels). Every row becomes a
`MultiLabelSample`, so the decoding cache, bad-file report and batching of class folders apply unchanged.

The split is made once and recorded in the run's split.json like class folders' (finetune/split.py): each
file with its subset, SHA-256 and labels, so `--resume` and `finetune.evaluate` reuse it and a changed CSV or
image is named and refused. Multi-label data cannot be stratified exactly on every label at once; each image
is stratified on its rarest label (negatives form their own group), the usual approximation, which puts at
least one image of every label used twice or more in validation.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from finetune.checkpoint import write_json
from finetune.class_names import check_class_names, shown_name
from finetune.data import DatasetSplit, Sample, stratified_split
from finetune.errors import CheckpointError, DatasetError
from finetune.images import is_image_file
from finetune.split import SPLIT_FILE, SPLIT_VERSION, hash_files

CSV_FILE = "labels.csv"  # the name the Train tab looks for inside a zip
PATH_COLUMN, LABELS_COLUMN = "path", "labels"
LAYOUT = "csv"
NO_LABEL = "(no label)"  # the stratum (and split.json "class") of images without any label
MAX_CSV_BYTES = 64 * 1024 * 1024
_SEPARATORS = re.compile(r"[;\s]+")


@dataclass
class MultiLabelSample(Sample):
    """One image and the indices of every label it shows; `target` is its split stratum (rarest label)."""

    labels: tuple[int, ...] = ()


@dataclass
class MultiLabelSplit(DatasetSplit):
    """A CSV dataset's split; `classes` are the label names, samples are `MultiLabelSample`s."""

    csv_path: Path | None = None

    def positive_counts(self, samples: Sequence[MultiLabelSample] | None = None) -> dict[str, int]:
        """Images showing each label (training images by default)."""
        counts = Counter(i for sample in (self.train if samples is None else samples) for i in sample.labels)
        return {name: counts.get(index, 0) for index, name in enumerate(self.classes)}

    def label_sets(self) -> dict[Path, tuple[int, ...]]:
        """Label indices by image path, across all subsets (to give decoded caches their targets)."""
        return {s.path: s.labels for samples in self.subsets().values() for s in samples}


def is_labels_csv(path: Path | str) -> bool:
    """Whether a training or evaluation source is a labels CSV (a `.csv` file) rather than a folder."""
    path = Path(path)
    return path.suffix.lower() == ".csv" and not path.is_dir()


def labels_source(folder: Path) -> Path:
    """What to train on for an uploaded dataset folder: its labels.csv when it has one, else the folder."""
    csv_path = Path(folder) / CSV_FILE
    return csv_path if csv_path.is_file() else Path(folder)


def split_labels(cell: str) -> list[str]:
    """The label names of one `labels` cell, split on spaces and semicolons, in order, without repeats."""
    return list(dict.fromkeys(part for part in _SEPARATORS.split(cell.strip()) if part))


def read_labels_csv(
    csv_path: Path, known_labels: Sequence[str] | None = None
) -> tuple[list[str], list[tuple[Path, list[str]]]]:
    """Sorted label names and (absolute path, label names) rows of a labels CSV, every mistake refused.

    With `known_labels` (evaluating a run), a label the run does not know is an error; without (training),
    a label used by a single image is one, as it could be neither learned nor measured.
    """
    csv_path = Path(csv_path)
    rows = _read_rows(csv_path)
    root = Path(os.path.abspath(csv_path.parent))
    entries: list[tuple[Path, list[str]]] = []
    problems: list[str] = []
    seen: dict[Path, int] = {}
    for line, (path_cell, labels_cell) in rows:
        path = _resolve(root, path_cell, line, csv_path)
        if path in seen:
            raise DatasetError(
                f"{csv_path} lists '{path_cell}' twice (lines {seen[path]} and {line}); give each image one "
                "row with all of its labels."
            )
        seen[path] = line
        if not path.is_file():
            problems.append(f"line {line}: '{path_cell}' does not exist")
        elif not is_image_file(path):
            problems.append(f"line {line}: '{path_cell}' is not an image file")
        entries.append((path, split_labels(labels_cell)))
    if problems:
        shown = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise DatasetError(
            f"{csv_path} names {len(problems)} path(s) that are not images beside it: {shown}. Paths are "
            "relative to the CSV's folder; fix or remove those rows."
        )
    counts = Counter(name for _, names in entries for name in names)
    if known_labels is not None:
        unknown = sorted(set(counts) - set(known_labels))
        if unknown:
            raise DatasetError(
                f"{csv_path} uses label(s) {', '.join(shown_name(n) for n in unknown[:5])} that this run "
                f"does not know; its labels are {', '.join(known_labels[:10])}"
                f"{'...' if len(known_labels) > 10 else ''}."
            )
        return list(known_labels), entries
    labels = sorted(counts)
    check_class_names(labels, f"in {csv_path.name}")
    if len(labels) < 1:
        raise DatasetError(f"{csv_path} has no labels at all; put names in the '{LABELS_COLUMN}' column.")
    once = [name for name in labels if counts[name] == 1]
    if once:
        raise DatasetError(
            f"label(s) {', '.join(shown_name(n) for n in once[:10])} in {csv_path} are used by a single "
            "image; one example can neither teach a label nor measure it: add images with it, or remove it."
        )
    return labels, entries


def scan_labels_csv(
    csv_path: Path, val_fraction: float = 0.2, seed: int = 0, val_max_images: int = 0
) -> MultiLabelSplit:
    """Read a labels CSV and split it into train and validation (stratified on each image's rarest label)."""
    labels, entries = read_labels_csv(csv_path)
    samples = make_samples(entries, labels)
    train, val = stratified_split(samples, val_fraction, seed, val_max_images)
    return MultiLabelSplit(
        classes=labels, train=train, val=val, layout=LAYOUT, csv_path=Path(os.path.abspath(csv_path))
    )


def make_samples(entries: Sequence[tuple[Path, list[str]]], labels: Sequence[str]) -> list[MultiLabelSample]:
    """Samples with label indices; each is stratified on its rarest label, negatives on their own."""
    index = {name: i for i, name in enumerate(labels)}
    counts = Counter(name for _, names in entries for name in names)
    samples = []
    for path, names in entries:
        indices = tuple(sorted(index[name] for name in names))
        rarest = min(names, key=lambda name: (counts[name], name)) if names else None
        stratum = index[rarest] if rarest is not None else len(labels)
        samples.append(MultiLabelSample(path=path, target=stratum, labels=indices))
    return samples


def multi_hot(label_sets: Sequence[Sequence[int]], num_labels: int) -> torch.Tensor:
    """(N, L) float32 targets: 1 where an image shows the label."""
    targets = torch.zeros(len(label_sets), num_labels)
    for row, indices in enumerate(label_sets):
        targets[row, list(indices)] = 1.0
    return targets


def write_csv_split(run_dir: Path, split: MultiLabelSplit, workers: int | None = None) -> None:
    """split.json for a CSV dataset: split.py's format (its readers still parse it) plus each file's labels.

    Its `classes` are the strata (labels, then NO_LABEL) and each file's `class` its stratum, so split.py's
    `read_split` reads it; the INT8 check then sees classes that differ from the run's labels and calibrates
    on photos rather than scoring multi-label images as single-label ones.
    """
    assert split.csv_path is not None
    root = split.csv_path.parent
    strata = [*split.classes, NO_LABEL]
    entries = [(sample, subset) for subset, samples in split.subsets().items() for sample in samples]
    digests = hash_files([sample.path for sample, _ in entries], workers)
    files = [
        {
            "path": Path(os.path.abspath(sample.path)).relative_to(root).as_posix(),
            "class": strata[sample.target],
            "labels": [split.classes[i] for i in sample.labels],
            "subset": subset,
            "sha256": digest,
        }
        for (sample, subset), digest in zip(entries, digests, strict=True)
    ]
    write_json(
        Path(run_dir) / SPLIT_FILE,
        {
            "version": SPLIT_VERSION,
            "data_dir": str(root),
            "layout": LAYOUT,
            "csv": split.csv_path.name,
            "csv_sha256": hash_files([split.csv_path])[0],
            "labels": split.classes,
            "classes": strata,
            "hash": "sha256",
            "counts": {s: sum(f["subset"] == s for f in files) for s in ("train", "val", "test")},
            "files": files,
        },
    )


@dataclass
class CsvSplitRecord:
    """A CSV run's recorded split: the split itself plus what it was made from."""

    split: MultiLabelSplit
    csv_sha256: str
    sha256: dict[Path, str] = field(default_factory=dict)

    def changes(self, workers: int | None = None) -> list[str]:
        """What differs on disk since the split was made: the CSV, or an image's bytes ('' when none)."""
        assert self.split.csv_path is not None
        problems = []
        if hash_files([self.split.csv_path], workers)[0] != self.csv_sha256:
            problems.append(f"{self.split.csv_path.name} was edited or removed")
        paths = list(self.sha256)
        changed = [p for p, d in zip(paths, hash_files(paths, workers), strict=True) if d != self.sha256[p]]
        if changed:
            shown = ", ".join(p.name for p in changed[:3]) + (", ..." if len(changed) > 3 else "")
            problems.append(f"{len(changed)} image(s) changed or went missing ({shown})")
        return problems

    def unchanged(self, samples: Sequence[MultiLabelSample], workers: int | None = None) -> list:
        """Those of `samples` whose file still has its recorded bytes."""
        digests = hash_files([s.path for s in samples], workers)
        return [s for s, d in zip(samples, digests, strict=True) if d == self.sha256.get(s.path)]


def read_csv_split(run_dir: Path) -> CsvSplitRecord | None:
    """The recorded split of a CSV run, or None when the run has none or was trained on class folders."""
    path = Path(run_dir) / SPLIT_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("layout") != LAYOUT:
            return None
        root, labels = Path(data["data_dir"]), list(data["labels"])
        index = {name: i for i, name in enumerate(labels)}
        strata = list(data["classes"])
        subsets: dict[str, list[MultiLabelSample]] = {"train": [], "val": [], "test": []}
        digests = {}
        for f in data["files"]:
            sample = MultiLabelSample(
                path=root / f["path"], target=strata.index(f["class"]),
                labels=tuple(index[name] for name in f["labels"]),
            )  # fmt: skip
            subsets[f["subset"]].append(sample)
            digests[sample.path] = f["sha256"]
        split = MultiLabelSplit(
            classes=labels, train=subsets["train"], val=subsets["val"], test=subsets["test"], layout=LAYOUT,
            csv_path=root / data["csv"],
        )  # fmt: skip
        return CsvSplitRecord(split, str(data["csv_sha256"]), digests)
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{path} is damaged ({error}); start a new run.") from error


def csv_dataset_split(config: Any, is_main: bool, resume: bool) -> MultiLabelSplit:
    """The trainer's split of a labels CSV: made and recorded by a new run, read back (and checked) on resume.

    Like class folders (trainer `_dataset_split`), a resumed run whose CSV or images changed is refused, as
    resplitting would move trained-on images into validation.
    """
    record = read_csv_split(config.out) if resume else None
    if record is not None:
        changes = record.changes(config.workers or None)
        if changes:
            raise DatasetError(
                f"the dataset '{config.data_dir}' changed since this run started: {'; '.join(changes)}. "
                "Resuming would train and validate on other images than the run so far; restore the files, "
                f"or start a new run: python -m finetune {config.data_dir} --out NEW_RUN_DIR."
            )
        return record.split
    split = scan_labels_csv(config.data_dir, config.val_fraction, config.seed, config.val_max_images)
    if is_main and not resume:
        write_csv_split(config.out, split, config.workers or None)
    return split


def _read_rows(csv_path: Path) -> list[tuple[int, tuple[str, str]]]:
    """(line number, (path cell, labels cell)) of every non-empty row; header and size checked."""
    if not csv_path.is_file():
        raise DatasetError(f"labels file '{csv_path}' does not exist.")
    if csv_path.stat().st_size > MAX_CSV_BYTES:
        raise DatasetError(f"{csv_path} is larger than {MAX_CSV_BYTES >> 20} MB; split it or trim it.")
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{csv_path} is not UTF-8 text ({error.reason}); save it as UTF-8 CSV.") from error
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    columns = [cell.strip().lower() for cell in header or []]
    missing = [name for name in (PATH_COLUMN, LABELS_COLUMN) if name not in columns]
    if missing:
        raise DatasetError(
            f"{csv_path} has no '{missing[0]}' column (header: {', '.join(columns) or 'empty'}); its first "
            f"line must name the columns, e.g. '{PATH_COLUMN},{LABELS_COLUMN}', then one "
            "'image.jpg,cat dog' row per image."
        )
    path_at, labels_at = columns.index(PATH_COLUMN), columns.index(LABELS_COLUMN)
    rows = []
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        cells = row + [""] * (max(path_at, labels_at) + 1 - len(row))
        if not cells[path_at].strip():
            raise DatasetError(f"{csv_path} line {line} has an empty '{PATH_COLUMN}'; name an image.")
        rows.append((line, (cells[path_at].strip(), cells[labels_at])))
    if not rows:
        raise DatasetError(f"{csv_path} lists no images; add one 'path,labels' row per image.")
    return rows


def _resolve(root: Path, cell: str, line: int, csv_path: Path) -> Path:
    """An image path relative to the CSV's folder; absolute paths and paths leading out of it are refused.

    The app accepts zips with a labels.csv inside, so a row must never point at a file outside the dataset.
    """
    relative = Path(cell.replace("\\", "/"))
    path = Path(os.path.normpath(root / relative))
    if relative.is_absolute() or not path.is_relative_to(root) or path == root:
        raise DatasetError(
            f"{csv_path} line {line}: '{cell}' is not inside the CSV's folder; give paths relative to it."
        )
    return path
