"""Write the example photos the app shows (run once; the JPEGs are committed, scikit-image is dev-only).

python demo/examples/make_examples.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")  # real photos shipped with scikit-image
MAX_SIDE = 480  # small files for the repo, still larger than the models' inputs
QUALITY = 88


def main() -> int:
    from skimage import data

    folder = Path(__file__).resolve().parent
    for name in PHOTOS:
        image = Image.fromarray(np.asarray(getattr(data, name)())).convert("RGB")
        image.thumbnail((MAX_SIDE, MAX_SIDE), Image.LANCZOS)
        image.save(folder / f"{name}.jpg", quality=QUALITY, optimize=True)
        print(folder / f"{name}.jpg", image.size)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
