"""Bounded reads of image metadata: what a file's headers would cost Pillow to parse, and EXIF orientation.

Pillow parses TIFF-structured metadata (a TIFF file's first IFD, a JPEG's EXIF and MPF blocks) by copying
every entry's data out of the file. Entries may all point at one large blob, so a 4 MB block can make it
copy gigabytes (600 entries x 4 MB). `metadata_copy_bytes` walks the same headers without copying anything
and says how many bytes that parse would copy (PNG text chunks: how much they could inflate to), so
`finetune.images` can refuse a file before Pillow opens it. `read_orientation` reads EXIF orientation
from a small block with a 12-byte-per-entry scan, never through Pillow's `getexif`.
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO

from PIL import Image, JpegImagePlugin, PngImagePlugin

EXIF_ORIENTATION = 0x0112
TIFF_MAGICS = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# bytes per value of each TIFF field type (BYTE, ASCII, SHORT, LONG, RATIONAL, ..., LONG8, SLONG8, IFD8)
_TYPE_SIZES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8, 17: 8}
MAX_JPEG_SEGMENTS = 1000  # markers before the image data; cameras write about 10-30
MAX_JPEG_JUNK = 64 * 1024  # stray bytes between markers, which Pillow would skip one at a time
MAX_PNG_CHUNKS = 100_000  # encoders split image data into 8-64 KB chunks: about 12,000 for a 100 MB file


class MalformedMetadataError(ValueError):
    """Raised when headers are built to make parsing slow (thousands of segments, megabytes of junk)."""


def metadata_copy_bytes(fp: BinaryIO, prefix: bytes) -> int:
    """Bytes Pillow would copy or inflate out of this file's metadata when opening it; 0 if none.

    `fp` must be seekable; its position is left anywhere (callers seek back). Pillow parses JPEG EXIF and
    MPF blocks and a TIFF's first IFD at open time, and inflates PNG text chunks (up to 64 MB in all);
    WebP, GIF and BMP keep metadata as bytes.
    """
    if prefix.startswith(JPEG_MAGIC):
        return sum(_ifd0_copy_bytes(io.BytesIO(block)) for block in _jpeg_tiff_blocks(fp))
    if prefix[:4] in TIFF_MAGICS:
        return _ifd0_copy_bytes(fp, is_file=True)
    if prefix.startswith(PNG_MAGIC):
        return _png_text_bytes(fp)
    return 0


def _png_text_bytes(fp: BinaryIO) -> int:
    """Upper bound of the text Pillow keeps from a PNG's tEXt/zTXt/iTXt chunks (compressed ones inflate to
    at most `MAX_TEXT_CHUNK` each); reads chunk headers only."""
    fp.seek(8)
    total = chunks = 0
    while True:
        header = fp.read(8)
        if len(header) < 8:
            return total
        length, kind = struct.unpack(">I4s", header)
        chunks += 1
        if chunks > MAX_PNG_CHUNKS:
            raise MalformedMetadataError(f"more than {MAX_PNG_CHUNKS:,} PNG chunks")
        if kind == b"IEND":
            return total
        if kind == b"tEXt":
            total += length
        elif kind in (b"zTXt", b"iTXt"):  # iTXt may be compressed; count it as if it were
            total += max(length, min(PngImagePlugin.MAX_TEXT_CHUNK, length * 1032))  # deflate's max ratio
        fp.seek(length + 4, 1)  # data and CRC


def _jpeg_tiff_blocks(fp: BinaryIO) -> list[bytes]:
    """A JPEG's EXIF (APP1) and MPF (APP2) blocks up to the image data, walking markers as Pillow does."""
    fp.seek(2)
    blocks: list[bytes] = []
    segments = junk = 0
    while True:
        byte = fp.read(1)
        if not byte:
            return blocks
        if byte != b"\xff":
            junk += 1
            if junk > MAX_JPEG_JUNK:
                raise MalformedMetadataError(f"more than {MAX_JPEG_JUNK:,} stray bytes between JPEG markers")
            continue
        code = fp.read(1)
        if not code or code == b"\x00":
            continue
        if code == b"\xff":  # fill byte: the second 0xFF may start the marker
            fp.seek(-1, 1)
            continue
        marker = 0xFF00 | code[0]
        if marker not in JpegImagePlugin.MARKER:
            return blocks  # Pillow stops here too ("no marker found")
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise MalformedMetadataError(f"more than {MAX_JPEG_SEGMENTS:,} JPEG header segments")
        if JpegImagePlugin.MARKER[marker][2] is None:
            continue  # SOI, EOI, RSTn: no length
        if marker == 0xFFDA:  # start of scan: headers are over
            return blocks
        length_bytes = fp.read(2)
        if len(length_bytes) < 2:
            return blocks
        length = int.from_bytes(length_bytes, "big") - 2
        if length < 0:
            return blocks
        if marker in (0xFFE1, 0xFFE2):
            data = fp.read(length)
            if data.startswith(b"Exif\x00\x00"):
                blocks.append(data[6:])
            elif data.startswith(b"MPF\x00"):
                blocks.append(data[4:])
        else:
            fp.seek(length, 1)


def _ifd0_copy_bytes(fp: BinaryIO, is_file: bool = False) -> int:
    """Bytes a TIFF-IFD parser copies for the out-of-line values of IFD0 (one copy per distinct tag).

    Reads only the header and the IFD's entries (at most 65,535 x 12 bytes), never the values.
    """
    fp.seek(0, 2)
    length = fp.tell()
    fp.seek(0)
    header = fp.read(16)
    if len(header) < 8 or header[:2] not in (b"II", b"MM"):
        return 0
    endian = "<" if header[:2] == b"II" else ">"
    is_big = is_file and struct.unpack(endian + "H", header[2:4])[0] == 43
    if is_big and len(header) < 16:
        return 0
    offset = struct.unpack(endian + ("Q" if is_big else "I"), header[8:16] if is_big else header[4:8])[0]
    count_format, inline = ("Q", 8) if is_big else ("H", 4)
    entry_format = "HHQ" if is_big else "HHI"
    count_size = struct.calcsize(count_format)
    entry_size = struct.calcsize(entry_format) + inline
    fp.seek(offset)
    count_bytes = fp.read(count_size)
    if len(count_bytes) < count_size:
        return 0
    (count,) = struct.unpack(endian + count_format, count_bytes)
    entries = fp.read(min(count, 65_535) * entry_size)
    sizes: dict[int, int] = {}
    for position in range(0, len(entries) - entry_size + 1, entry_size):
        tag, kind, values = struct.unpack_from(endian + entry_format, entries, position)
        size = values * _TYPE_SIZES.get(kind, 0)
        if size > inline:
            pointer = entries[position + entry_size - inline : position + entry_size]
            (value_offset,) = struct.unpack(endian + ("Q" if is_big else "I"), pointer)
            sizes[tag] = max(0, min(size, length - value_offset))
    return sum(sizes.values())


def exif_block(image: Image.Image) -> bytes | None:
    """The raw EXIF block Pillow keeps for this image (JPEG/WebP/PNG `exif`, PNG text profile), or None."""
    raw = image.info.get("exif")
    if isinstance(raw, bytes):
        return raw
    text = image.info.get("Raw profile type exif")  # ImageMagick's PNG text chunk: a header, then hex
    if isinstance(text, str):
        try:
            return bytes.fromhex("".join(text.split("\n")[3:]))
        except ValueError:
            return None
    return None


def read_orientation(block: bytes) -> int:
    """The EXIF Orientation (1-8) in IFD0 of `block`, 1 when absent or invalid; reads no other entry."""
    if block.startswith(b"Exif\x00\x00"):
        block = block[6:]
    if len(block) < 8 or block[:2] not in (b"II", b"MM"):
        return 1
    endian = "<" if block[:2] == b"II" else ">"
    (offset,) = struct.unpack_from(endian + "I", block, 4)
    if offset + 2 > len(block):
        return 1
    (count,) = struct.unpack_from(endian + "H", block, offset)
    for index in range(count):
        position = offset + 2 + 12 * index
        if position + 12 > len(block):
            break
        tag, kind, values = struct.unpack_from(endian + "HHI", block, position)
        if tag == EXIF_ORIENTATION and kind == 3 and values >= 1:
            (value,) = struct.unpack_from(endian + "H", block, position + 8)
            return value if 1 <= value <= 8 else 1
    return 1
