"""Bounded-time fuzz run: odd and hostile image files through every door an image comes in by.

    python bench/fuzz.py                     # 120 s of loops + training and predict: ~150 s, seed 0
    python bench/fuzz.py --seconds 600 --seed 7

The corpus is `tests/hostile_files.py` (refused formats named `photo.png`, EXIF/TIFF/PNG-text bombs, slow
JPEG headers, a 4x20000 strip, an 8000x8000 PNG, a header claiming 10 gigapixels, a 3000-frame GIF, odd
modes: 16-bit, CMYK, LA, P with transparency, 1x1, MPO) plus random mutations of valid JPEG, PNG, GIF,
WebP, TIFF, BMP and MPO files (truncations, byte flips, patched header dimensions, repeated segments)
under odd names. Each file goes through:
1. `finetune.images.open_image` with the upload and the local limits, until the time share for it is used;
2. a tiny training (`python -m finetune`, test_efficientnet, random init) on good and bad files mixed;
3. `python -m finetune.predict` with that run on a folder of corpus files;
4. the app's `classify`, `explain` and `batch` endpoints on a real server on 127.0.0.1 with that run
   (Detect and Segment are left out: their random-init torchvision models cost seconds per call here).

Every outcome is one of: ok, refused (an `ImageError`/`StudioError` message, a `gr.Error` shown to the
visitor, a CSV/table row with its error, a bad-files report entry), crash (any other exception, a
traceback, an unanswered file) or hang (over the per-item timeout). Counts are printed per door; the exit
status is 1 when anything crashed or hung.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import random
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import hostile_files  # noqa: E402
from PIL import Image  # noqa: E402

from finetune.errors import StudioError  # noqa: E402
from finetune.images import LOCAL_LIMITS, UPLOAD_LIMITS, is_image_file, open_image  # noqa: E402

OUTCOMES = ("ok", "refused", "crash", "hang")
GENERIC_APP_ERROR = "raised an exception but has not enabled verbose error reporting"
STEMS = ("photo", "with space", "ünïcödé", "日本語", "-dash", "=HYPERLINK(1)", "x" * 150, "..", "#tag%20")
SUFFIXES = (".png", ".jpg", ".JPEG", ".gif", ".webp", ".tif", ".bmp", ".PNG")


class Tally:
    """Outcome counts per door, with the first few crash and hang details kept for the report."""

    def __init__(self) -> None:
        self.counts: dict[str, Counter[str]] = {}
        self.details: list[str] = []

    def add(self, door: str, outcome: str, detail: str = "") -> None:
        self.counts.setdefault(door, Counter())[outcome] += 1
        if outcome in ("crash", "hang") and len(self.details) < 20:
            self.details.append(f"{door}: {outcome}: {detail[:300]}")

    @property
    def is_clean(self) -> bool:
        return not any(counter["crash"] or counter["hang"] for counter in self.counts.values())

    def report(self) -> str:
        lines = [f"{'door':<28}" + "".join(f"{name:>9}" for name in OUTCOMES)]
        for door, counter in self.counts.items():
            lines.append(f"{door:<28}" + "".join(f"{counter[name]:>9}" for name in OUTCOMES))
        return "\n".join(lines + self.details)


def seeds() -> dict[str, bytes]:
    """Valid files of every allowed format, to mutate."""
    return {
        "jpeg": hostile_files.jpeg((96, 72)),
        "progressive": hostile_files.jpeg((96, 72), progressive=True),
        "exif_jpeg": _jpeg_with_orientation(),
        "png": hostile_files.png((96, 72)),
        "gif": hostile_files.gif((96, 72)),
        "animated_gif": hostile_files.many_frame_gif(frames=20, size=(24, 24)),
        "webp": hostile_files.webp((96, 72)),
        "tiff": hostile_files.tiff((96, 72)),
        "bmp": hostile_files.bmp((96, 72)),
        "mpo": hostile_files.mpo((96, 72)),
    }


def _jpeg_with_orientation() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return hostile_files.jpeg((96, 72), exif=exif.tobytes())


def fixed_corpus() -> list[tuple[str, bytes]]:
    """The named hostile files and odd-but-valid modes."""
    items = [
        (f"{fmt.lower()}_as_photo.png", hostile_files.refused_format(fmt))
        for fmt in hostile_files.REFUSED_FORMATS
    ]
    items += [
        ("exif_bomb.png", hostile_files.exif_bomb_png()),
        ("exif_bomb.jpg", hostile_files.exif_bomb_jpeg()),
        ("exif_bomb.webp", hostile_files.exif_bomb_webp()),
        ("ifd_bomb.tif", hostile_files.tiff_ifd_bomb()),
        ("text_bomb.png", hostile_files.png_text_bomb()),
        ("many_segments.jpg", hostile_files.jpeg_many_segments()),
        ("junk.jpg", hostile_files.jpeg_junk(200_000)),
        ("thin.png", hostile_files.thin_png()),
        ("big.png", hostile_files.big_png(8000, 8000)),
        ("huge_header.png", hostile_files.huge_header_png()),
        ("many_frames.gif", hostile_files.many_frame_gif()),
        ("empty.png", b""),
        ("text.jpg", b"not an image at all\n" * 10),
    ]
    items += list(hostile_files.mode_variants().items())
    return items


def mutate(rng: random.Random, data: bytes) -> bytes:
    """One random damage: truncate, flip bytes (anywhere or in the header), patch sizes, repeat a slice."""
    kind = rng.choice(("truncate", "flip", "flip_header", "dimensions", "repeat", "flip_many"))
    if kind == "truncate":
        return data[: rng.randrange(1, len(data))]
    if kind in ("flip", "flip_header", "flip_many"):
        mutable = bytearray(data)
        limit = min(len(data), 96) if kind == "flip_header" else len(data)
        for _ in range(rng.randint(1, 40 if kind == "flip_many" else 4)):
            mutable[rng.randrange(limit)] = rng.randrange(256)
        return bytes(mutable)
    if kind == "dimensions":
        return patch_dimensions(rng, data)
    start = rng.randrange(len(data))
    piece = data[start : start + rng.randint(1, 64)]
    return data[:start] + piece * rng.randint(2, 200) + data[start:]


def patch_dimensions(rng: random.Random, data: bytes) -> bytes:
    """Rewrite the width/height a header claims (keeping PNG's CRC valid), to sizes from 0 to 2^31."""
    width, height = (rng.choice((0, 1, 3, 65535, 30000, 2**31 - 1, rng.randrange(1, 20000))) for _ in "wh")
    if data.startswith(b"\x89PNG"):
        ihdr = struct.pack(">II", width, height) + data[24:29]
        return data[:16] + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) + data[33:]
    if data.startswith(b"GIF"):
        return data[:6] + struct.pack("<HH", width & 0xFFFF, height & 0xFFFF) + data[10:]
    if data.startswith(b"BM"):
        return data[:18] + struct.pack("<ii", width, -height if rng.random() < 0.5 else height) + data[26:]
    sof = data.find(b"\xff\xc0")
    if data.startswith(b"\xff\xd8") and sof > 0:
        return data[: sof + 5] + struct.pack(">HH", height & 0xFFFF, width & 0xFFFF) + data[sof + 9 :]
    return mutate(rng, data)


def random_name(rng: random.Random, index: int) -> str:
    return f"{index:04d}_{rng.choice(STEMS)}{rng.choice(SUFFIXES)}"


def mutated_corpus(rng: random.Random, count: int) -> list[tuple[str, bytes]]:
    pool = list(seeds().values())
    return [(random_name(rng, index), mutate(rng, rng.choice(pool))) for index in range(count)]


def run_with_timeout(pool: ThreadPoolExecutor, fn: Callable[[], object], timeout_s: float) -> tuple[str, str]:
    """(outcome, detail) of one call: ok, refused (StudioError), crash (anything else) or hang."""
    future = pool.submit(fn)
    try:
        future.result(timeout=timeout_s)
        return "ok", ""
    except FutureTimeout:
        return "hang", f"over {timeout_s} s"
    except StudioError as error:
        return "refused", str(error)
    except Exception as error:  # a fuzz run counts every other exception as a crash
        return "crash", f"{type(error).__name__}: {error}"


def fuzz_open_image(
    corpus: list[tuple[str, bytes]], rng: random.Random, seconds: float, tally: Tally, timeout_s: float
) -> None:
    """Door 1: the fixed corpus once, then fresh mutations until `seconds` are used."""
    deadline = time.monotonic() + seconds
    pool = ThreadPoolExecutor(max_workers=1)
    items = iter(corpus)
    index = 0
    while True:
        item = next(items, None)
        if item is None:
            if time.monotonic() > deadline:
                break
            item = mutated_corpus(rng, 1)[0]
        name, data = item
        for label, limits in (("open_image upload", UPLOAD_LIMITS), ("open_image local", LOCAL_LIMITS)):
            outcome, detail = run_with_timeout(
                pool, lambda d=data, lim=limits: open_image(d, draft_size=(146, 146), limits=lim), timeout_s
            )
            tally.add(label, outcome, f"{name}: {detail}")
            if outcome == "hang":
                pool = ThreadPoolExecutor(max_workers=1)  # the stuck thread keeps the old pool
        index += 1
    print(f"open_image: {index} files", flush=True)


def write_files(folder: Path, items: list[tuple[str, bytes]]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in items:
        path = folder / name
        path.write_bytes(data)
        paths.append(path)
    return paths


def good_images(count: int, hue: int) -> list[tuple[str, bytes]]:
    """Plain learnable pictures for the training folder: one colour per class, some noise."""
    rng = random.Random(hue)
    items = []
    for index in range(count):
        color = tuple((hue * (channel + 1) + rng.randrange(40)) % 256 for channel in range(3))
        image = Image.new("RGB", (72, 64), color)
        image.putpixel((rng.randrange(72), rng.randrange(64)), (255, 255, 255))
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        items.append((f"good_{index:02d}.png", buffer.getvalue()))
    return items


def fuzz_training(work: Path, corpus: list[tuple[str, bytes]], tally: Tally, timeout_s: float) -> Path | None:
    """Door 2: `python -m finetune` on two classes of good images mixed with corpus files."""
    data = work / "train_data"
    half = len(corpus) // 2
    write_files(data / "red", good_images(10, 200) + corpus[:half])
    write_files(data / "blue", good_images(10, 60) + corpus[half:])
    run_dir = work / "run"
    command = [
        sys.executable,
        "-m",
        "finetune",
        str(data),
        "--out",
        str(run_dir),
        "--model",
        "test_efficientnet",
        "--weights",
        "none",
        "--img-size",
        "64",
        "--epochs",
        "1",
        "--strategy",
        "finetune",
        "--batch-size",
        "8",
        "--quiet",
    ]
    outcome, detail = run_cli(command, timeout_s)
    if outcome != "ok":
        tally.add("train (whole run)", outcome, detail)
        return None
    bad_report = run_dir / "bad_files.txt"
    bad = bad_report.read_text().count("\n") if bad_report.is_file() else 0
    scanned = 20 + sum(is_image_file(Path(name)) for name, _ in corpus)
    tally.counts.setdefault("train (files)", Counter()).update({"ok": scanned - bad, "refused": bad})
    tally.add("train (whole run)", "ok")
    return run_dir


def run_cli(command: list[str], timeout_s: float) -> tuple[str, str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return "hang", f"{command[2]} over {timeout_s} s"
    if done.returncode == 0:
        return "ok", ""
    if done.returncode == 2 and done.stderr.strip().splitlines()[-1:][0].startswith("error:"):
        return "refused", done.stderr.strip().splitlines()[-1]
    return "crash", f"rc {done.returncode}: {done.stderr[-1500:]}"


def fuzz_predict(
    work: Path, run_dir: Path, corpus: list[tuple[str, bytes]], tally: Tally, timeout_s: float
) -> None:
    """Door 3: `python -m finetune.predict` on a folder of corpus files; every file must get a row."""
    folder = work / "predict"
    paths = write_files(folder, corpus)
    out = work / "predictions.csv"
    command = [
        sys.executable,
        "-m",
        "finetune.predict",
        str(folder),
        "--checkpoint",
        str(run_dir),
        "--runtime",
        "torch",
        "--out",
        str(out),
        "--quiet",
    ]
    outcome, detail = run_cli(command, timeout_s)
    if outcome in ("crash", "hang") or not out.is_file():
        tally.add("predict (whole run)", outcome, detail)
        return
    with open(out, newline="", encoding="utf-8") as handle:
        rows = {Path(row["path"]).name: row for row in csv.DictReader(handle)}
    for path in (path for path in paths if is_image_file(path)):  # the folder scan skips other names
        row = rows.get(path.name)
        if row is None:
            tally.add("predict (files)", "crash", f"{path.name}: no row")
        else:
            tally.add("predict (files)", "refused" if row["error"] else "ok")


def fuzz_app(
    run_dir: Path, paths: list[Path], rng: random.Random, seconds: float, tally: Tally, timeout_s: float
) -> None:
    """Door 4: classify every file, explain a sample, batch groups, then classify mutations until the end."""
    from app_server import serve
    from gradio_client import Client, handle_file

    from demo.service import InferenceService

    service = InferenceService.from_checkpoint(run_dir, runtime="torch")
    deadline = time.monotonic() + seconds
    try:
        with serve(service) as url:
            client = Client(url, verbose=False)

            def call(door: str, *args: object) -> None:
                job = client.submit(*args, api_name=f"/{door}")
                try:
                    result = job.result(timeout=timeout_s)
                except TimeoutError:
                    tally.add(door, "hang", f"{args[0]}: over {timeout_s} s")
                    return
                except Exception as error:
                    message = str(error)
                    is_clear = type(error).__name__ == "AppError" and GENERIC_APP_ERROR not in message
                    tally.add(door, "refused" if is_clear else "crash", f"{type(error).__name__}: {message}")
                    return
                if door == "batch":
                    for row in result[0]["data"]:
                        tally.add("batch (files)", "refused" if row[4] else "ok")
                else:
                    tally.add(door, "ok")

            for path in paths:
                call("classify", handle_file(path), 3)
            for path in rng.sample(paths, min(12, len(paths))):
                call("explain", handle_file(path), "", 0.5)
            for start in range(0, len(paths), 25):
                call("batch", [handle_file(path) for path in paths[start : start + 25]])
            extra = paths[0].parent / "extra"
            index = 0
            while time.monotonic() < deadline:
                name, data = mutated_corpus(rng, 1)[0]
                call("classify", handle_file(write_files(extra, [(f"{index}_{name}", data)])[0]), 3)
                index += 1
    finally:
        service.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--seconds",
        type=float,
        default=120.0,
        help="time for the open_image and app loops (default 120); training and predict run once on top",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed for mutations and names (default 0)")
    parser.add_argument("--item-timeout-s", type=float, default=30.0, help="per file or request (default 30)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", module="PIL")  # "Truncated File Read" and friends, once per bad file
    rng = random.Random(args.seed)
    tally = Tally()
    corpus = fixed_corpus() + mutated_corpus(rng, 40)
    started = time.monotonic()
    fuzz_open_image(corpus, rng, args.seconds * 0.4, tally, args.item_timeout_s)
    with tempfile.TemporaryDirectory(prefix="fuzz-") as tmp:
        work = Path(tmp)
        small = [(name, data) for name, data in corpus if name != "big.png"]  # the server tests big.png
        run_dir = fuzz_training(work, rng.sample(small, 24), tally, timeout_s=600)
        if run_dir is None:
            print(tally.report())
            return 1
        fuzz_predict(work, run_dir, corpus, tally, timeout_s=600)
        app_paths = write_files(
            work / "app", [(f"{i:03d}_{name}", data) for i, (name, data) in enumerate(corpus)]
        )
        fuzz_app(run_dir, app_paths, rng, args.seconds * 0.6, tally, args.item_timeout_s)
    print(
        f"\nfuzz run: {len(corpus)} corpus files + mutations, seed {args.seed}, "
        f"{time.monotonic() - started:.0f} s"
    )
    print(tally.report())
    return 0 if tally.is_clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
