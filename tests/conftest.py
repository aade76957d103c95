"""Shared fixtures: real images from packages written to disk, and tiny real run folders.

Everything is offline: `HF_HUB_OFFLINE` is set so nothing tries the network, and Gradio analytics are off.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from finetune.cpu_features import has_int8_dot_product  # noqa: E402

TINY_MODEL = "test_efficientnet"  # timm's tiny random-init CNN; test_vit covers the ViT paths

# INT8 answers stay close to FP32 only on CPUs with 8-bit dot-product instructions (finetune/cpu_features.py);
# elsewhere the export's check refuses them, which tests/test_quantize.py checks on any CPU.
needs_int8_dot_product = pytest.mark.skipif(
    has_int8_dot_product() is False,
    reason="this CPU has no 8-bit dot-product instructions: INT8 exports are refused here, by design",
)


def photo(name: str) -> Image.Image:
    """A real photo shipped with scikit-image (chelsea, coffee, astronaut, rocket, ...)."""
    from skimage import data

    array = getattr(data, name)()
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    return Image.fromarray(array)


def write_digits_folder(
    root: Path, classes: tuple[int, ...] = (0, 1, 2), per_class: int = 12, size: int = 32
) -> Path:
    """sklearn's real handwritten digits as RGB PNGs in one subfolder per class."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for digit in classes:
        folder = root / f"digit_{digit}"
        folder.mkdir(parents=True, exist_ok=True)
        indices = np.flatnonzero(digits.target == digit)[:per_class]
        for n, index in enumerate(indices):
            pixels = (digits.images[index] * (255.0 / 16.0)).astype(np.uint8)
            Image.fromarray(pixels).convert("RGB").resize((size, size), Image.BICUBIC).save(
                folder / f"{n:03d}.png"
            )
    return root


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """chelsea.jpg, coffee.jpg, astronaut.jpg and rocket.jpg on disk."""
    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "astronaut", "rocket"):
        photo(name).save(folder / f"{name}.jpg", quality=92)
    return folder


@pytest.fixture
def digits_dir(tmp_path: Path) -> Path:
    """Three classes of 12 real digits each, as 32 px PNGs."""
    return write_digits_folder(tmp_path / "digits")


@pytest.fixture(scope="session")
def untrained_run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of a random-init tiny model with three labels: the format without any training."""
    from finetune.checkpoint import save_run
    from finetune.modeling import create_model_and_transforms

    created = create_model_and_transforms(TINY_MODEL, num_classes=3, weights="none", img_size=64)
    run_dir = tmp_path_factory.mktemp("untrained_run")
    save_run(
        run_dir, created.model, ["cat", "coffee", "rocket"], created.data_config, {"weights_source": "none"}
    )
    return run_dir


@pytest.fixture(scope="module")
def service():
    """The app's inference service on the embedded ImageNet model (one per test module)."""
    from demo.service import InferenceService

    service = InferenceService.from_checkpoint(None)
    try:
        yield service
    finally:
        service.close()
