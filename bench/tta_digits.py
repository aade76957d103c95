"""Does test-time augmentation pay? Top-1 of a run on a labelled folder with and without `--tta` views.

    python bench/finetune_digits.py --work /tmp/digits            # the digits benchmark: run + held-out split
    python bench/tta_digits.py /tmp/digits/run /tmp/digits/data/test   # then this, on the same held-out 30%

Each scale set is a list of zoom factors (see `finetune.inference.parse_tta`); every image is decoded once
and classified under each set by the same classifier, so only the views differ between rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALE_SETS = ("none", "default", "1,0.875", "1,1.15", "1,0.875,1.15,1.3")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="run folder")
    parser.add_argument("data_dir", type=Path, help="held-out folder with one subfolder per label")
    parser.add_argument("--runtime", default="auto", help="auto, onnx or torch (default: auto)")
    parser.add_argument("--scales", nargs="+", default=list(SCALE_SETS), help="scale sets to compare")
    args = parser.parse_args(argv)

    from finetune.checkpoint import load_run
    from finetune.images import is_image_file
    from finetune.inference import parse_tta
    from finetune.runtime import create_classifier

    run = load_run(args.run_dir)
    classifier = create_classifier(run, args.runtime)
    files = sorted(p for p in args.data_dir.rglob("*") if p.is_file() and is_image_file(p))
    targets = np.array([run.labels.index(path.parent.name) for path in files])
    images = [classifier.open(path) for path in files]
    print(f"{len(files)} images, {classifier.runtime} runtime, input {run.data_config['input_size'][1:]} px")
    for text in args.scales:
        scales = parse_tta(None if text == "none" else text)
        start = time.perf_counter()
        probs = np.concatenate(
            [classifier.predict_probs(images[i : i + 64], tta=scales) for i in range(0, len(images), 64)]
        )
        seconds = time.perf_counter() - start
        top1 = float((probs.argmax(axis=1) == targets).mean())
        errors = int((probs.argmax(axis=1) != targets).sum())
        views = "plain view" if scales is None else f"zooms {', '.join(f'{s:g}' for s in scales)}"
        print(f"tta {text:>18}: top-1 {top1:.4f} ({errors} wrong), {views}, {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
