"""Datasets: how a folder is laid out, its class folders, a stratified split, and the order of batches.

The images themselves are decoded once into a uint8 cache by `finetune.pixel_cache`.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from finetune.class_names import check_class_names
from finetune.errors import DatasetError, ImageError
from finetune.images import image_size, is_image_file

TRAIN_DIR_NAMES = ("train",)
VAL_DIR_NAMES = ("val", "valid", "validation")
TEST_DIR_NAMES = ("test",)
SPLIT_DIR_NAMES = (*TRAIN_DIR_NAMES, *VAL_DIR_NAMES, *TEST_DIR_NAMES)  # top folders of a split layout
SUBSETS = ("train", "val", "test")


@dataclass
class Sample:
    """One image file and its class index."""

    path: Path
    target: int


@dataclass(frozen=True)
class Layout:
    """Where a dataset's subsets live: class folders at the root, or `train/` with optional `val/`, `test/`.

    `test/` is only ever evaluated at the end; without `val/`, validation images are split out of `train/`.
    """

    root: Path
    train_dir: Path  # the root itself for plain class folders
    val_dir: Path | None = None
    test_dir: Path | None = None

    @property
    def name(self) -> str:
        """'folders', 'train', 'train+val', 'train+test' or 'train+val+test' (saved with the run)."""
        if self.train_dir == self.root:
            return "folders"
        return "+".join(["train"] + [n for n, d in (("val", self.val_dir), ("test", self.test_dir)) if d])

    @property
    def has_val_folder(self) -> bool:
        return self.val_dir is not None

    def class_roots(self) -> list[Path]:
        """The folders that hold class subfolders: train, then val and test when present."""
        return [d for d in (self.train_dir, self.val_dir, self.test_dir) if d is not None]


@dataclass
class DatasetSplit:
    """Train, validation and (optional) test samples of a class-folder dataset, with class names in order."""

    classes: list[str]
    train: list[Sample]
    val: list[Sample]
    has_val_folder: bool = False  # True when DATA_DIR had its own val/ folder rather than a split we made
    test: list[Sample] = field(default_factory=list)  # from a test/ folder: never trained on or selected by
    layout: str = "folders"  # Layout.name

    def class_counts(self, samples: Sequence[Sample] | None = None) -> dict[str, int]:
        counts = Counter(sample.target for sample in (self.train if samples is None else samples))
        return {name: counts.get(index, 0) for index, name in enumerate(self.classes)}

    def subsets(self) -> dict[str, list[Sample]]:
        """Samples by subset name ('train', 'val', 'test')."""
        return {"train": self.train, "val": self.val, "test": self.test}


def find_layout(data_dir: Path, source: str | None = None) -> Layout:
    """Decide how DATA_DIR is organised; the one place that knows the folder names (CLI and uploads alike).

    A `train/` folder means split folders: everything else at the top must be `val/` (or `valid/`,
    `validation/`) or `test/`, and their classes must be classes of `train/`. Without `train/`, the top
    folders are the classes, and a `val/` or `test/` among them is refused: it would silently become a class
    (a "test vs the rest" classifier). `source` names the dataset in messages (default: the path).
    """
    data_dir = Path(data_dir)
    where = source or f"'{data_dir}'"
    folders = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    train_dir = _first_existing(data_dir, TRAIN_DIR_NAMES)
    val_dir = _first_existing(data_dir, VAL_DIR_NAMES)
    test_dir = _first_existing(data_dir, TEST_DIR_NAMES)
    if train_dir is None:
        split_folders = [p.name for p in (val_dir, test_dir) if p is not None]
        if split_folders:
            raise DatasetError(
                f"{where} has a {split_folders[0]}/ folder but no train/ folder; put the training class "
                f"folders in train/ (beside {split_folders[0]}/), or rename {split_folders[0]}/ if it is a "
                "class."
            )
        return Layout(root=data_dir, train_dir=data_dir)
    known = {p.name for p in (train_dir, val_dir, test_dir) if p is not None}
    extra = [name for name in folders if name not in known]
    if extra:
        raise DatasetError(
            f"{where} has a train/ folder and also {', '.join(repr(n) for n in extra[:5])}; with train/, "
            "every class folder goes inside train/ (and val/ or test/); move or remove the others."
        )
    classes = set(_folder_names(train_dir))
    for other in (val_dir, test_dir):
        unknown = sorted(set(_folder_names(other)) - classes) if other is not None else []
        if unknown:
            raise DatasetError(
                f"the {other.name}/ folder of {where} has classes that train/ lacks: "
                f"{', '.join(unknown[:5])}; give every class images in train/."
            )
    return Layout(root=data_dir, train_dir=train_dir, val_dir=val_dir, test_dir=test_dir)


def scan_dataset(
    data_dir: Path, val_fraction: float = 0.2, seed: int = 0, val_max_images: int = 0
) -> DatasetSplit:
    """Find classes and images by `find_layout`; without a val/ folder, make a stratified, seeded split
    (`val_fraction` of each class, at most `val_max_images` in all when that is set)."""
    data_dir = Path(data_dir)
    if not data_dir.exists():
        raise DatasetError(f"dataset folder '{data_dir}' does not exist.")
    if not data_dir.is_dir():
        raise DatasetError(f"'{data_dir}' is a file; pass a folder with one subfolder per class.")
    layout = find_layout(data_dir)
    classes = _class_names(layout.train_dir)
    samples = _samples(layout.train_dir, classes)
    _require_images(layout.train_dir, classes, samples)
    if layout.val_dir is not None:
        train, val = samples, _samples(layout.val_dir, classes)
    else:
        train, val = stratified_split(samples, val_fraction, seed, val_max_images)
    test = _samples(layout.test_dir, classes) if layout.test_dir is not None else []
    return DatasetSplit(
        classes=classes, train=train, val=val, has_val_folder=layout.has_val_folder, test=test,
        layout=layout.name,
    )  # fmt: skip


def stratified_split(
    samples: Sequence[Sample], val_fraction: float, seed: int, val_max_images: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Per class, a seeded shuffle then `val_fraction` of it (at least one image) to validation.

    With `val_max_images`, a large set holds out a smaller share, the same for every class, so that about
    that many images validate in all: a few thousand measure a score to a few tenths of a point, and the rest
    train. A class with a single image stays in training: it could not be learned otherwise.
    """
    if val_max_images and len(samples) * val_fraction > val_max_images:
        val_fraction = val_max_images / len(samples)
    rng = np.random.default_rng(seed)
    train: list[Sample] = []
    val: list[Sample] = []
    for target in sorted({sample.target for sample in samples}):
        members = sorted((s for s in samples if s.target == target), key=lambda s: str(s.path))
        order = rng.permutation(len(members))
        n_val = 0 if len(members) < 2 else max(1, round(len(members) * val_fraction))
        val.extend(members[i] for i in order[:n_val])
        train.extend(members[i] for i in order[n_val:])
    return train, val


VAL_MAX_IMAGES = 5000  # default cap of a split's validation images (--val-max-images; stratified_split)
SMALL_IMAGE_FLOOR = 64  # px: below this a stride-32 backbone ends in a single 1x1 cell


def suggest_image_size(samples: Sequence[Sample], native_size: int, max_probe: int = 200) -> int:
    """A train resolution for the data: native for photos, about 2x the source for small images.

    Upscaling a 64 px digit to 224 px costs 3x the compute of 128 px for no extra information; we stop at
    twice the typical short side (rounded to 32), between SMALL_IMAGE_FLOOR and the model's native size.
    A 28 px product photo thus trains at 64 px, not 96: 2.25x fewer pixels a step, so a time budget buys
    about twice the updates on a large dataset (issue 19), and the features still see 2x2 final cells.
    """
    step = max(1, len(samples) // max_probe)
    sides = []
    for sample in list(samples)[::step][:max_probe]:
        try:
            sides.append(min(image_size(sample.path)))
        except ImageError:  # unreadable files are reported later by the cache; size only needs a sample
            continue
    if not sides:
        return native_size
    typical = statistics.median(sides)
    if typical >= native_size * 0.75:
        return native_size
    return int(min(native_size, max(SMALL_IMAGE_FLOOR, 32 * round(2 * typical / 32))))


def batches(
    count: int,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    drop_last: bool = False,
    sample_weights: torch.Tensor | None = None,
) -> Iterator[torch.Tensor]:
    """Index batches for one epoch: seeded per epoch (so a resumed run sees the same order), sharded by rank.

    With `sample_weights`, indices are drawn with replacement in proportion to them (class-balanced sampling).
    Every rank gets the same number of batches, padding by wrapping around, so collective ops never hang.
    """
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)
    if sample_weights is not None:
        order = torch.multinomial(sample_weights, count, replacement=True, generator=generator)
    elif shuffle:
        order = torch.randperm(count, generator=generator)
    else:
        order = torch.arange(count)
    per_rank = -(-count // world_size)
    if world_size > 1:
        order = torch.cat([order, order[: per_rank * world_size - count]])[rank::world_size]
    if drop_last and len(order) >= batch_size:
        order = order[: len(order) - len(order) % batch_size]
    yield from torch.split(order, batch_size)


def write_bad_files(path: Path, bad_files: Sequence[tuple[Path, str]]) -> None:
    """The full list of skipped files, one `path<TAB>reason` line each, for the run folder."""
    from finetune.checkpoint import atomic_write

    text = "".join(f"{file}\t{reason}\n" for file, reason in bad_files)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _first_existing(root: Path, names: Sequence[str]) -> Path | None:
    for name in names:
        if (root / name).is_dir():
            return root / name
    return None


def _folder_names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_names(root: Path) -> list[str]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        found = f"only '{classes[0]}'" if classes else "none"
        raise DatasetError(
            f"'{root}' needs at least 2 class subfolders (one per class, images inside); found {found}."
        )
    check_class_names(classes, f"in '{root}'")  # a new dataset's folder names become the model's labels
    return classes


def _samples(root: Path, classes: Sequence[str]) -> list[Sample]:
    samples = []
    for target, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
        samples.extend(Sample(path=p, target=target) for p in files if not p.name.startswith("."))
    return samples


def _require_images(root: Path, classes: Sequence[str], samples: Sequence[Sample]) -> None:
    counts = Counter(sample.target for sample in samples)
    empty = [name for index, name in enumerate(classes) if counts.get(index, 0) == 0]
    if empty:
        raise DatasetError(
            f"class folder(s) {', '.join(repr(n) for n in empty)} in '{root}' have no images "
            "(.jpg .jpeg .png .bmp .gif .webp .tif .tiff); add images or remove the folder."
        )
