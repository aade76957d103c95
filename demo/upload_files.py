"""What every dataset upload shares: its limits and result types, and the checked steps of writing images.

Class-folder uploads (`demo.uploads`) and labels-CSV zips (`demo.labels_zip`) both bound the decoded size of
all images from their headers before a byte is written, verify each image with `open_image` (the pixel
limit, a real decode) before writing it, and report what they skipped and why. Those steps live here, once,
so both importers call the same code and neither imports the other's private helpers.
"""

from __future__ import annotations

import io
import secrets
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from finetune.errors import DatasetError, ImageError
from finetune.images import UPLOAD_LIMITS, open_image
from finetune.images import decoded_bytes as image_decoded_bytes

VERIFY_DRAFT = (64, 64)  # JPEGs are verified by a reduced-size decode: the whole stream is still read
HEADER_BYTES = 256 * 1024  # read from each entry to learn its size; JPEG EXIF may take the first 64 kB


@dataclass(frozen=True)
class UploadLimits:
    """Bounds on one uploaded dataset; they protect the server's disk, memory and time."""

    max_files: int = 10_000  # entries in a zip (or files in a class upload)
    max_total_bytes: int = 2 * 1024**3  # uncompressed bytes of the whole dataset
    max_file_bytes: int = 50 * 1024**2  # uncompressed bytes of one file
    max_ratio: float = 100.0  # uncompressed / compressed size of one entry; image files stay near 1
    ratio_min_bytes: int = 1024**2  # small entries may compress well (a blank BMP); only big ones count
    max_archive_ratio: float = 50.0  # all entries' bytes / the zip's size: many small blank BMPs add up
    max_decoded_bytes: int = 32 * 1024**3  # width x height x channels of all images, read from headers


DEFAULT_LIMITS = UploadLimits()  # the bounds an import uses when its caller gives none


@dataclass(frozen=True)
class SkippedFile:
    """An uploaded file that is not in the dataset, and why."""

    name: str
    reason: str


@dataclass
class ImportedDataset:
    """A dataset folder written from an upload, its classes and what was left out."""

    root: Path
    class_counts: dict[str, int]
    skipped: list[SkippedFile] = field(default_factory=list)
    has_val_folder: bool = False

    @property
    def num_images(self) -> int:
        return sum(self.class_counts.values())

    def summary(self, max_listed: int = 10) -> str:
        """One paragraph for the UI: classes with counts, then the skipped files and why."""
        classes = ", ".join(f"{name} ({count})" for name, count in self.class_counts.items())
        text = f"{self.num_images} images in {len(self.class_counts)} classes: {classes}."
        if self.skipped:
            listed = "; ".join(f"{item.name}: {item.reason}" for item in self.skipped[:max_listed])
            more = f"; and {len(self.skipped) - max_listed} more" if len(self.skipped) > max_listed else ""
            text += f" Skipped {len(self.skipped)} file(s): {listed}{more}."
        return text


def check_decoded_size(headers: Iterable[bytes | Path], limits: UploadLimits, source: str) -> None:
    """Refuse a dataset whose images decode to more than `max_decoded_bytes` in all, from headers alone."""
    total = 0
    for count, header in enumerate(headers, start=1):
        total += decoded_bytes(header)
        if total > limits.max_decoded_bytes:
            raise DatasetError(
                f"the images in {source} decode to more than {limits.max_decoded_bytes / 1e9:,.1f} GB of "
                f"pixels (reached at image {count:,}); send fewer or smaller images."
            )


def decoded_bytes(header: bytes | Path) -> int:
    """Width x height x channels x bytes per channel of an image, from its header (nothing is decoded).

    0 when the header cannot be read: such a file is refused later, with its reason, by the full check.
    """
    try:
        return image_decoded_bytes(header, UPLOAD_LIMITS)
    except ImageError:
        return 0


def member_header(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limits: UploadLimits) -> bytes:
    """The first bytes of a zip entry (enough for an image header), or all of it when the header lies
    further in (a TIFF may keep its directory at the end); bounded by `max_file_bytes`."""
    try:
        with archive.open(info) as member:
            head = member.read(HEADER_BYTES)
            if decoded_bytes(head) or len(head) < HEADER_BYTES:
                return head
            return head + member.read(limits.max_file_bytes - len(head))
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError):
        return b""  # a damaged entry is reported when it is extracted


def file_header(path: Path, limits: UploadLimits) -> bytes:
    with path.open("rb") as handle:
        head = handle.read(HEADER_BYTES)
        if decoded_bytes(head) or len(head) < HEADER_BYTES:
            return head
        return head + handle.read(limits.max_file_bytes - len(head))


def extract_image(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, root: Path, parts: tuple[str, ...], limits: UploadLimits
) -> str:
    """Write one verified image under `root`; returns why it was skipped, or "" when written."""
    if info.file_size > limits.max_file_bytes:
        return too_big(info.file_size, limits)
    try:
        with archive.open(info) as member:
            data = member.read(limits.max_file_bytes + 1)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as error:
        return f"damaged in the zip ({error})"
    if len(data) > limits.max_file_bytes:
        return too_big(len(data), limits)
    reason = image_problem(data)
    if reason:
        return reason
    target = root.joinpath(*parts)
    if not target.resolve().is_relative_to(root.resolve()):  # belt and braces: `_safe_parts` refused these
        raise DatasetError(f"the zip entry '{info.filename}' points outside its folder; the zip is refused.")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with target.open("xb") as handle:
            handle.write(data)
    except FileExistsError:
        return "the zip holds this path twice; the first copy is used"
    except OSError as error:
        return f"cannot be stored on the server ({error.strerror})"
    return ""


def image_problem(data: bytes) -> str:
    """Why `data` is not a usable image (open_image's message: format, decode, pixel limit), or ""."""
    try:
        open_image(io.BytesIO(data), draft_size=VERIFY_DRAFT, limits=UPLOAD_LIMITS)
    except ImageError as error:
        reason = str(error).removeprefix("the uploaded file ")  # the list shows the file's name before it
        return reason.removeprefix("is ")
    return ""


def new_dataset_dir(datasets_dir: Path) -> Path:
    datasets_dir.mkdir(parents=True, exist_ok=True)
    root = datasets_dir / secrets.token_hex(8)
    root.mkdir()
    return root


def too_big(size: int, limits: UploadLimits) -> str:
    return f"{size / 1e6:,.0f} MB, more than the {limits.max_file_bytes / 1e6:,.0f} MB limit per image"


def suffix_of(name: str) -> str:
    return PurePosixPath(name).suffix.lower() or "no extension"
