"""Builders of odd and hostile image files, as bytes: shared by the tests, the fuzz run and the benchmarks.

Each function returns the whole file, built with Pillow or by hand, so a test can write it under any name
(a hostile file is usually named `photo.png`). The builders are deterministic: the same call gives the same
bytes, so a failure reproduces.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

# formats Pillow can decode but `finetune.images` refuses; each builder writes a small, valid file
REFUSED_FORMATS = ("EPS", "PCX", "TGA", "SGI", "PPM", "ICO", "IM", "DDS", "QOI")


def _saved(image: Image.Image, fmt: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _sample(size: tuple[int, int] = (32, 32), mode: str = "RGB") -> Image.Image:
    """A small picture with some structure (a gradient), so decoders have real work."""
    width, height = size
    gradient = Image.linear_gradient("L").resize(size)
    if mode == "L":
        return gradient
    rgb = Image.merge("RGB", (gradient, gradient.rotate(90), Image.new("L", size, 128)))
    return rgb.convert(mode) if mode != "RGB" else rgb


def eps() -> bytes:
    """A 154-byte-class EPS: Pillow would hand it to Ghostscript (`gs`) to render."""
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n"
        b"%%BoundingBox: 0 0 32 32\n"
        b"%%EndComments\n"
        b"newpath 0 0 moveto 32 0 lineto 32 32 lineto closepath fill\n"
        b"showpage\n"
        b"%%EOF\n"
    )


def pcx() -> bytes:
    return _saved(_sample(), "PCX")


def tga() -> bytes:
    return _saved(_sample(), "TGA")


def sgi() -> bytes:
    return _saved(_sample(), "SGI")


def ppm() -> bytes:
    return _saved(_sample(), "PPM")


def ico() -> bytes:
    return _saved(_sample(), "ICO")


def im() -> bytes:
    return _saved(_sample(), "IM")


def dds() -> bytes:
    return _saved(_sample(mode="RGBA"), "DDS")


def qoi() -> bytes:
    return _saved(_sample(), "QOI")


def refused_format(fmt: str) -> bytes:
    """The small file of one of `REFUSED_FORMATS`."""
    return {
        "EPS": eps,
        "PCX": pcx,
        "TGA": tga,
        "SGI": sgi,
        "PPM": ppm,
        "ICO": ico,
        "IM": im,
        "DDS": dds,
        "QOI": qoi,
    }[fmt]()


def png(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    return _saved(_sample(size, mode), "PNG")


def jpeg(size: tuple[int, int] = (64, 64), mode: str = "RGB", **params: object) -> bytes:
    return _saved(_sample(size, mode), "JPEG", **params)


def webp(size: tuple[int, int] = (64, 64)) -> bytes:
    return _saved(_sample(size), "WEBP")


def bmp(size: tuple[int, int] = (64, 64)) -> bytes:
    return _saved(_sample(size), "BMP")


def gif(size: tuple[int, int] = (64, 64)) -> bytes:
    return _saved(_sample(size).convert("P"), "GIF")


def tiff(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    return _saved(_sample(size, mode), "TIFF")


def mpo(size: tuple[int, int] = (64, 48)) -> bytes:
    """A phone-style multi-picture JPEG (two frames); Pillow opens such files as format MPO."""
    first = _sample(size)
    return _saved(first, "MPO", save_all=True, append_images=[first.rotate(180)])


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_with_chunks(base: bytes, chunks: bytes) -> bytes:
    """`base` (a PNG) with `chunks` inserted right after IHDR (8-byte signature + 25-byte IHDR chunk)."""
    return base[:33] + chunks + base[33:]


def exif_bomb(blob_bytes: int = 4 * 1024**2, entries: int = 600, orientation: int = 6) -> bytes:
    """A TIFF-structured EXIF block whose `entries` IFD0 entries all point at one `blob_bytes` blob.

    The block is about `blob_bytes` long, but a parser that copies each entry's data reads
    `entries * blob_bytes` (600 x 4 MB = 2.4 GB). The first entry is a real Orientation tag.
    """
    count = entries + 1
    ifd_size = 2 + 12 * count + 4
    blob_offset = 8 + ifd_size
    ifd = struct.pack("<H", count)
    ifd += struct.pack("<HHI4s", 0x0112, 3, 1, struct.pack("<H", orientation) + b"\0\0")
    for index in range(entries):
        ifd += struct.pack("<HHII", 0x1000 + index, 7, blob_bytes, blob_offset)
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\xab" * blob_bytes


def exif_bomb_png(
    size: tuple[int, int] = (64, 64), blob_bytes: int = 4 * 1024**2, entries: int = 600
) -> bytes:
    """A small PNG with a ~4 MB `eXIf` chunk holding `exif_bomb` (7.4 s and +2.4 GB in `exif_transpose`)."""
    return _png_with_chunks(png(size), png_chunk(b"eXIf", exif_bomb(blob_bytes, entries)))


def exif_bomb_jpeg(size: tuple[int, int] = (64, 64)) -> bytes:
    """A JPEG whose APP1 EXIF (limited to 64 KiB by the format) holds as many blob pointers as fit."""
    block = exif_bomb(blob_bytes=40_000, entries=2000)
    return jpeg(size, exif=b"Exif\x00\x00" + block[:65_000])


def jpeg_many_segments(segments: int = 20_000) -> bytes:
    """A JPEG with thousands of empty comment segments before its image data (Pillow walks each in Python)."""
    base = jpeg((32, 32))
    return base[:2] + b"\xff\xfe\x00\x02" * segments + base[2:]


def jpeg_junk(junk_bytes: int = 5 * 1024**2) -> bytes:
    """A JPEG with megabytes of stray bytes after a comment segment; Pillow skips them one byte at a time."""
    base = jpeg((32, 32))
    return base[:2] + b"\xff\xfe\x00\x02" + b"\x00" * junk_bytes + base[2:]


def exif_bomb_webp(size: tuple[int, int] = (64, 64)) -> bytes:
    return _saved(_sample(size), "WEBP", exif=b"Exif\x00\x00" + exif_bomb(blob_bytes=1024**2, entries=300))


def tiff_ifd_bomb(blob_bytes: int = 2 * 1024**2, entries: int = 400) -> bytes:
    """A TIFF whose first IFD holds `entries` private tags all pointing at one blob (Pillow copies each)."""
    # a strip of raw RGB pixels, the required tags, then the bomb entries
    width = height = 16
    pixels = bytes(width * height * 3)
    tags = [
        (256, 3, 1, width),
        (257, 3, 1, height),
        (258, 3, 1, 8),  # Pillow reads one value for all three samples here
        (259, 3, 1, 1),
        (262, 3, 1, 2),
        (273, 4, 1, 0),  # StripOffsets, filled in below
        (277, 3, 1, 3),
        (278, 3, 1, height),
        (279, 4, 1, len(pixels)),
    ]
    count = len(tags) + entries
    ifd_size = 2 + 12 * count + 4
    blob_offset = 8 + ifd_size
    pixel_offset = blob_offset + blob_bytes
    ifd = struct.pack("<H", count)
    for tag, typ, n, value in tags:
        if tag == 273:
            value = pixel_offset
        packed = struct.pack("<H", value) + b"\0\0" if typ == 3 else struct.pack("<I", value)
        ifd += struct.pack("<HHI", tag, typ, n) + packed
    for index in range(entries):
        ifd += struct.pack("<HHII", 40000 + index, 7, blob_bytes, blob_offset)
    ifd += struct.pack("<I", 0)
    return b"II*\x00" + struct.pack("<I", 8) + ifd + b"\xcd" * blob_bytes + pixels


def png_text_bomb(chunks: int = 64, size: tuple[int, int] = (64, 64)) -> bytes:
    """A small PNG with `chunks` zTXt chunks of ~1 KB that each inflate to 1 MB (Pillow keeps up to 64 MB)."""
    text = zlib.compress(b" " * (1024**2 - 1), 9)
    inserted = b"".join(png_chunk(b"zTXt", f"k{index}".encode() + b"\0\0" + text) for index in range(chunks))
    return _png_with_chunks(png(size), inserted)


def thin_png(width: int = 4, height: int = 20_000) -> bytes:
    """A few hundred bytes that a shorter-side resize to 256 px turns into 256 x 1,280,000 pixels."""
    return _saved(Image.new("L", (width, height), 200), "PNG", optimize=True)


def big_png(width: int = 8000, height: int = 8000) -> bytes:
    """A blank RGB PNG: ~200 KB on the wire, width * height * 4 bytes once decoded (256 MB at 8000 x 8000)."""
    raw_row = b"\x00" + bytes(width * 3)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(raw_row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")
    )


def huge_header_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims `width` x `height` pixels but holds almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + png_chunk(b"IEND", b"")
    )


def many_frame_gif(frames: int = 3000, size: tuple[int, int] = (16, 16)) -> bytes:
    """An animated GIF with thousands of frames: counting them (`n_frames`) means parsing every one."""
    width, height = size
    images = []
    for index in range(frames):
        frame = Image.new("L", size, 0)
        frame.putpixel((index % width, (index // width) % height), 255)  # each frame differs from the last
        images.append(frame)
    return _saved(images[0], "GIF", save_all=True, append_images=images[1:], duration=10, loop=0)


def mode_variants() -> dict[str, bytes]:
    """Valid files in unusual modes and shapes that must still open (name -> bytes)."""
    rgba = _sample((40, 30), "RGBA")
    palette = _sample((40, 30)).convert("P")
    palette.info["transparency"] = 0
    ramp = np.linspace(0, 65535, 40 * 30).reshape(30, 40).astype(np.uint16)
    return {
        "rgba.png": _saved(rgba, "PNG"),
        "la.png": _saved(_sample((40, 30), "L").convert("LA"), "PNG"),
        "p_transparent.png": _saved(palette, "PNG"),
        "p_transparent.gif": _saved(palette, "GIF"),
        "sixteen.png": _saved(Image.fromarray(ramp), "PNG"),
        "cmyk.jpg": _saved(_sample((40, 30), "CMYK"), "JPEG"),
        "cmyk.tif": _saved(_sample((40, 30), "CMYK"), "TIFF"),
        "one_bit.bmp": _saved(_sample((40, 30), "1"), "BMP"),
        "gray.webp": _saved(_sample((40, 30), "L"), "WEBP"),
        "one_pixel.png": _saved(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "phone_mpo.jpg": mpo(),  # phones name their MPO files .jpg
    }
