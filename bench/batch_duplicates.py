"""What one Batch request costs when it lists the same large PNG many times, against as many different files.

    python bench/batch_duplicates.py            # 16 x a 6000x6000 PNG (~120 KB), tiny random-init model
    python bench/batch_duplicates.py --side 4000 --copies 8

Each case runs in a fresh process so its peak RSS is its own. "same file" is one upload listed N times
(decoded once since the service keys files by their bytes); "different files" are N PNGs of the same size
whose bytes differ by one pixel, which is what every request paid before. Prints seconds and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def make_files(folder: Path, side: int, copies: int) -> list[Path]:
    """`copies` flat-colour PNGs of side x side pixels, each with one pixel changed (so different bytes)."""
    from PIL import Image

    files = []
    for n in range(copies):
        image = Image.new("RGB", (side, side), (120, 160, 200))
        image.putpixel((n, 0), (0, 0, 0))
        path = folder / f"photo-{n}.png"
        image.save(path, optimize=True)
        files.append(path)
    return files


def run_case(files: list[str], run_dir: str) -> dict[str, float]:
    """Classify `files` in one `predict_batch` call; seconds and peak RSS growth in MB."""
    from demo.service import InferenceService

    service = InferenceService.from_checkpoint(run_dir, runtime="torch")
    base_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    rows = service.predict_batch(files)
    seconds = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    service.close()
    assert not any(row.error for row in rows), rows
    return {"seconds": seconds, "peak_growth_mb": peak_mb - base_mb}


def make_run(folder: Path) -> Path:
    from finetune.checkpoint import save_run
    from finetune.modeling import create_model_and_transforms

    created = create_model_and_transforms("test_efficientnet", num_classes=3, weights="none", img_size=64)
    save_run(folder, created.model, ["a", "b", "c"], created.data_config, {"weights_source": "none"})
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=6000, help="image side in pixels (default: 6000)")
    parser.add_argument("--copies", type=int, default=16, help="files in the request (default: 16)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        run_dir = make_run(folder / "run")
        files = make_files(folder, args.side, args.copies)
        size_kb = files[0].stat().st_size / 1024
        cases = {
            "same file": [str(files[0])] * args.copies,
            "different files": [str(path) for path in files],
        }
        print(f"{args.copies} x {args.side}x{args.side} PNG ({size_kb:.0f} KB each) in one batch:")
        for name, paths in cases.items():
            result = subprocess.run(
                [sys.executable, __file__, "--case", json.dumps([paths, str(run_dir)])],
                capture_output=True,
                text=True,
                cwd=ROOT,
                check=True,
            )
            figures = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"  {name:16s} {figures['seconds']:6.2f} s, peak RSS +{figures['peak_growth_mb']:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
