"""A Train-tab zip that holds a `labels.csv` beside its images: a multi-label dataset, imported safely.

`demo.uploads.import_zip` has already checked the whole archive (links, encryption, zip bombs, `..` paths)
when it hands the entries over. Here the images in the CSV's folder (and below it) are extracted and verified
one by one like class-folder uploads; the CSV is then rewritten with only the rows whose image was
extracted (each dropped row is listed as skipped, with why), and read by `finetune.labels_csv`, so a bad CSV
gets the CLI's own messages (missing column, label used once, path outside the folder) before any training.
"""

from __future__ import annotations

import csv
import io
import shutil
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from demo.upload_files import (
    ImportedDataset,
    SkippedFile,
    UploadLimits,
    check_decoded_size,
    extract_image,
    member_header,
    new_dataset_dir,
)
from finetune.errors import DatasetError
from finetune.images import is_image_file
from finetune.labels_csv import CSV_FILE, PATH_COLUMN, scan_labels_csv

Entry = tuple[tuple[str, ...], zipfile.ZipInfo]


@dataclass
class LabelledDataset(ImportedDataset):
    """An imported multi-label dataset: `class_counts` are images per label (an image may have several)."""

    images: int = 0

    @property
    def num_images(self) -> int:
        return self.images

    def summary(self, max_listed: int = 10) -> str:
        text = super().summary(max_listed)
        head = f"{self.images} images with {len(self.class_counts)} labels ({CSV_FILE}), images per label:"
        return head + text.split(":", 1)[1]


def labels_csv_entry(entries: Sequence[Entry]) -> Entry | None:
    """The shallowest `labels.csv` of the zip (any case), or None for a class-folder zip."""
    found = [(parts, info) for parts, info in entries if parts[-1].lower() == CSV_FILE]
    return min(found, key=lambda entry: len(entry[0])) if found else None


def import_labels_zip(
    archive: zipfile.ZipFile,
    entries: Sequence[Entry],
    csv_entry: Entry,
    skipped: list[SkippedFile],
    datasets_dir: Path,
    limits: UploadLimits,
) -> ImportedDataset:
    """Extract the CSV's images and a cleaned `labels.csv` into a new folder; its labels as class counts."""
    base = csv_entry[0][:-1]  # the CSV's folder inside the zip: paths in it are relative to that folder
    members = []
    for parts, info in entries:
        if info is csv_entry[1]:
            continue
        if parts[: len(base)] != base:
            skipped.append(SkippedFile(info.filename, f"not beside {CSV_FILE} (in its folder or below)"))
        elif not is_image_file(PurePosixPath(parts[-1])):
            skipped.append(SkippedFile(info.filename, "not an image file"))
        else:
            members.append((parts[len(base) :], info))
    check_decoded_size((member_header(archive, info, limits) for _, info in members), limits, "the zip")
    root = new_dataset_dir(datasets_dir)
    try:
        written = set()
        for parts, info in members:
            reason = extract_image(archive, info, root, parts, limits)
            if reason:
                skipped.append(SkippedFile(info.filename, reason))
            else:
                written.add("/".join(parts))
        text = _read_csv_text(archive, csv_entry[1], limits)
        (root / CSV_FILE).write_text(_keep_written_rows(text, written, skipped), encoding="utf-8")
        split = scan_labels_csv(root / CSV_FILE)  # the CLI's checks and messages
        counts = split.positive_counts([*split.train, *split.val])
        return LabelledDataset(root, counts, skipped, images=len(split.train) + len(split.val))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


def _read_csv_text(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: UploadLimits) -> str:
    if info.file_size > limits.max_file_bytes:
        raise DatasetError(f"{CSV_FILE} in the zip is larger than {limits.max_file_bytes / 1e6:.0f} MB.")
    with archive.open(info) as member:
        data = member.read(limits.max_file_bytes + 1)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{CSV_FILE} in the zip is not UTF-8 text; save it as UTF-8 CSV.") from error


def _keep_written_rows(text: str, written: set[str], skipped: list[SkippedFile]) -> str:
    """The CSV without rows whose image is not in the dataset folder (each listed in `skipped`)."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return text  # scan_labels_csv names the problem
    header = [cell.strip().lower() for cell in rows[0]]
    if PATH_COLUMN not in header:
        return text
    at = header.index(PATH_COLUMN)
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(rows[0])
    for row in rows[1:]:
        cell = row[at].strip().replace("\\", "/").removeprefix("./") if len(row) > at else ""
        if cell and cell not in written:
            skipped.append(SkippedFile(cell, f"listed in {CSV_FILE} but not a usable image in the zip"))
            continue
        writer.writerow(row)
    return out.getvalue()
