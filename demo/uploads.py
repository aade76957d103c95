"""Turning browser uploads into a class-folder dataset on the server, safely: a zip, or files per typed class.

A zip comes from a stranger, so it is checked as a whole before anything is written: entries that would
land outside the target folder (absolute paths, `..`), symlinks, encrypted entries, too many files, too many
uncompressed bytes and suspicious compression ratios (zip bombs) refuse the whole upload with a message.
The whole archive's expansion (all entries' bytes over the zip's size) is bounded too, because thousands of
small blank BMPs each pass a per-entry ratio check. Class folder names pass `finetune.class_names`, and the
decoded size of every image (width x height x channels, read from its header without decoding) is summed
against a cap, all before a byte is written. Then each entry is read into memory (bounded), checked with
`open_image` (the pixel limit, a real decode) and only written when it is a usable image; everything
skipped is listed with its reason. The result is a folder `finetune.data.scan_dataset` reads
(`find_layout`): one subfolder per class, or `train/` (+ `val/`, `test/`) with class subfolders.
"""

from __future__ import annotations

import logging
import re
import shutil
import stat
import zipfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from demo.labels_zip import import_labels_zip, labels_csv_entry
from demo.upload_files import (
    DEFAULT_LIMITS,
    ImportedDataset,
    SkippedFile,
    UploadLimits,
    check_decoded_size,
    extract_image,
    file_header,
    image_problem,
    member_header,
    new_dataset_dir,
    suffix_of,
    too_big,
)
from finetune.class_names import check_class_names
from finetune.data import SPLIT_DIR_NAMES, TRAIN_DIR_NAMES, find_layout
from finetune.errors import DatasetError
from finetune.images import is_image_file

logger = logging.getLogger(__name__)

SYSTEM_FILES = {"thumbs.db", "desktop.ini", "__macosx"}  # metadata that zip tools on macOS/Windows add
_DRIVE = re.compile(r"^[A-Za-z]:")


def import_zip(zip_path: Path, datasets_dir: Path, limits: UploadLimits = DEFAULT_LIMITS) -> ImportedDataset:
    """Check the whole zip, then extract its usable images into a new folder under `datasets_dir`."""
    try:
        archive = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as error:
        raise DatasetError(
            "the upload is not a readable zip file; zip one folder per class (cats/1.jpg, dogs/1.jpg, ...)."
        ) from error
    with archive:
        entries, skipped = _checked_entries(archive, limits, zip_bytes=zip_path.stat().st_size)
        csv_entry = labels_csv_entry(entries)  # a zip with a labels.csv: a multi-label dataset
        if csv_entry is not None:
            return import_labels_zip(archive, entries, csv_entry, skipped, datasets_dir, limits)
        entries = _flatten_single_top_folder(entries)
        members = []
        for parts, info in entries:
            if len(parts) == 1:
                skipped.append(SkippedFile(info.filename, "not inside a class folder"))
            elif not is_image_file(PurePosixPath(parts[-1])):
                skipped.append(SkippedFile(info.filename, f"not an image file ({suffix_of(parts[-1])})"))
            else:
                members.append((parts, info))
        check_class_names(sorted({_class_of(parts, members) for parts, _ in members}), "in the zip")
        check_decoded_size(
            (member_header(archive, info, limits) for _, info in members), limits, source="the zip"
        )
        root = new_dataset_dir(datasets_dir)
        try:
            for parts, info in members:
                reason = extract_image(archive, info, root, parts, limits)
                if reason:
                    skipped.append(SkippedFile(info.filename, reason))
            return _finish(root, skipped, source="the zip")
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise


def import_class_files(
    classes: Sequence[tuple[str, Sequence[str | Path]]],
    datasets_dir: Path,
    limits: UploadLimits = DEFAULT_LIMITS,
) -> ImportedDataset:
    """A dataset from typed class names, each with its uploaded files (an upload's name is its file name)."""
    names = [name for name, _ in classes]
    require_class_names(names)
    files = [(name, Path(path)) for name, paths in classes for path in paths]
    if len(files) > limits.max_files:
        raise DatasetError(f"{len(files)} files uploaded; send at most {limits.max_files:,}.")
    total = sum(path.stat().st_size for _, path in files)
    if total > limits.max_total_bytes:
        raise DatasetError(
            f"the uploads hold {total / 1e6:,.0f} MB; the limit is {limits.max_total_bytes / 1e6:,.0f} MB."
        )
    check_decoded_size(
        (file_header(path, limits) for _, path in files if is_image_file(path)), limits, source="the uploads"
    )
    root = new_dataset_dir(datasets_dir)
    skipped: list[SkippedFile] = []
    try:
        for name in names:
            (root / name).mkdir()
        for index, (name, path) in enumerate(files):
            shown = f"{name}/{path.name}"
            if not is_image_file(path):
                skipped.append(SkippedFile(shown, f"not an image file ({suffix_of(path.name)})"))
                continue
            if path.stat().st_size > limits.max_file_bytes:
                skipped.append(SkippedFile(shown, too_big(path.stat().st_size, limits)))
                continue
            data = path.read_bytes()
            reason = image_problem(data)
            if reason:
                skipped.append(SkippedFile(shown, reason))
                continue
            (root / name / f"{index:05d}-{_safe_file_name(path.name)}").write_bytes(data)
        return _finish(root, skipped, source="the uploads", expected=names)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def parse_class_names(text: str) -> list[str]:
    """Class names typed as 'cat, dog' or one per line; checked with `require_class_names`."""
    names = [name.strip() for name in re.split(r"[,\n]", text or "") if name.strip()]
    require_class_names(names)
    return names


def require_class_names(names: Sequence[str], where: str = "") -> None:
    """At least two class names, each passing `finetune.class_names.check_class_names` (they are labels)."""
    if len(names) < 2:
        raise DatasetError(f"give at least 2 class names (got {len(names)}), e.g. 'cat, dog'.")
    check_class_names(names, where)


def _checked_entries(
    archive: zipfile.ZipFile, limits: UploadLimits, zip_bytes: int
) -> tuple[list[tuple[tuple[str, ...], zipfile.ZipInfo]], list[SkippedFile]]:
    """Every file entry as path parts; refuse the whole zip on anything unsafe, before writing a byte."""
    infos = archive.infolist()
    files = [info for info in infos if not info.is_dir()]
    if len(files) > limits.max_files:
        raise DatasetError(f"the zip holds {len(files):,} files; the limit is {limits.max_files:,}.")
    total = 0
    entries: list[tuple[tuple[str, ...], zipfile.ZipInfo]] = []
    skipped: list[SkippedFile] = []
    for info in infos:
        parts = _safe_parts(info.filename, is_dir=info.is_dir())
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise DatasetError(
                f"the zip contains a symbolic link ('{info.filename}'); links are refused. "
                "Zip the image files themselves."
            )
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise DatasetError(f"'{info.filename}' in the zip is encrypted; upload a zip without a password.")
        if info.file_size > limits.ratio_min_bytes and info.file_size > limits.max_ratio * max(
            info.compress_size, 1
        ):
            raise DatasetError(
                f"'{info.filename}' in the zip expands {info.file_size / max(info.compress_size, 1):,.0f}x "
                f"(to {info.file_size / 1e6:,.0f} MB); this looks like a zip bomb and the zip is refused."
            )
        total += info.file_size
        if total > limits.max_total_bytes:
            raise DatasetError(
                f"the zip expands to more than {limits.max_total_bytes / 1e6:,.0f} MB; upload a smaller "
                "dataset (fewer or smaller images)."
            )
        if any(part.startswith(".") or part.casefold() in SYSTEM_FILES for part in parts):
            skipped.append(SkippedFile(info.filename, "hidden or system file"))
            continue
        entries.append((parts, info))
    if total > limits.ratio_min_bytes and total > limits.max_archive_ratio * max(zip_bytes, 1):
        raise DatasetError(
            f"the zip expands {total / max(zip_bytes, 1):,.0f}x as a whole ({zip_bytes / 1e6:,.1f} MB to "
            f"{total / 1e6:,.0f} MB; the limit is {limits.max_archive_ratio:g}x): this looks like a zip bomb "
            "and the zip is refused. Photos barely compress; send JPEG or PNG files."
        )
    return entries, skipped


def _class_of(parts: tuple[str, ...], members: Sequence[tuple[tuple[str, ...], zipfile.ZipInfo]]) -> str:
    """The class folder an entry lands in, by `finetune.data.find_layout`'s rule: with a `train/` folder,
    the second folder under train/, val/ and test/; else the first."""
    tops = {p[0] for p, _ in members if len(p) > 2}
    has_train = any(name in tops for name in TRAIN_DIR_NAMES)
    is_split = has_train and len(parts) > 2 and parts[0] in SPLIT_DIR_NAMES
    return parts[1] if is_split else parts[0]


def _safe_parts(name: str, is_dir: bool = False) -> tuple[str, ...]:
    """Path parts of a zip entry name; absolute paths, drive letters, `..` and control characters refuse."""
    text = name.replace("\\", "/")
    parts = tuple(part for part in text.split("/") if part not in ("", "."))
    is_unsafe = text.startswith("/") or _DRIVE.match(text) or ".." in parts or not text.isprintable()
    if is_unsafe or not (parts or is_dir):
        raise DatasetError(
            f"the zip entry '{name}' points outside its folder (absolute path or '..'); the zip is refused. "
            "Zip a folder of class folders with relative paths."
        )
    return parts


def _flatten_single_top_folder(
    entries: list[tuple[tuple[str, ...], zipfile.ZipInfo]],
) -> list[tuple[tuple[str, ...], zipfile.ZipInfo]]:
    """`flowers/daisy/1.jpg` becomes `daisy/1.jpg`: zipping a folder adds its name above the classes."""
    while entries and all(len(parts) >= 3 for parts, _ in entries):
        tops = {parts[0] for parts, _ in entries}
        if len(tops) != 1:
            break
        entries = [(parts[1:], info) for parts, info in entries]
    return entries


def _finish(
    root: Path, skipped: list[SkippedFile], source: str, expected: Sequence[str] = ()
) -> ImportedDataset:
    """Count images per class; fewer than 2 usable classes is a `DatasetError` that says what was found."""
    layout = find_layout(root, source=source)  # the CLI's own rule: train/ (+ val/, test/) or class folders
    has_val = layout.has_val_folder
    counts: Counter[str] = Counter({name: 0 for name in expected})
    for class_root in (layout.train_dir, layout.val_dir):  # test/ images are never trained on
        if class_root is None:
            continue
        for folder in sorted(class_root.iterdir()):
            if folder.is_dir():
                counts[folder.name] += sum(1 for path in folder.rglob("*") if path.is_file())
    found = {name: count for name, count in sorted(counts.items()) if count > 0}
    if expected:
        found = {name: counts[name] for name in expected}
    empty = [name for name, count in found.items() if count == 0]
    if empty:
        raise DatasetError(
            f"class(es) {', '.join(repr(n) for n in empty)} got no usable image from {source}; "
            f"add images to every class ({_skipped_hint(skipped)})."
        )
    if len(found) < 2:
        what = f"only {next(iter(found))!r}" if found else "none"
        raise DatasetError(
            f"{source} needs images in at least 2 class folders (cats/1.jpg, dogs/1.jpg, ...); found {what}"
            f" ({_skipped_hint(skipped)})."
        )
    if not has_val and max(found.values()) < 2:
        raise DatasetError(
            f"every class in {source} has a single image; give some class at least 2 images so one can be "
            "held out for validation."
        )
    logger.info("Imported a dataset into %s: %s", root, found)
    return ImportedDataset(root=root, class_counts=found, skipped=skipped, has_val_folder=has_val)


def _skipped_hint(skipped: Sequence[SkippedFile]) -> str:
    if not skipped:
        return "no file was skipped"
    first = skipped[0]
    return f"{len(skipped)} file(s) skipped, e.g. {first.name}: {first.reason}"


def _safe_file_name(name: str) -> str:
    """A file name without separators or leading dots; an upload's name is only kept for readability."""
    cleaned = re.sub(r"[^\w.\-]+", "_", PurePosixPath(name.replace("\\", "/")).name).lstrip(".")
    return cleaned[-100:] or "image"
