"""Random-init torchvision detectors and segmenters of the real architectures, saved as local weight files.

The vision tests and the browser test run the real pipelines on these: offline, nothing mocked, and the
code path of a user who placed downloaded weights on disk. What they find is arbitrary, so tests check
shapes, thresholds and plumbing, never which objects are found.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from demo.vision_tasks import VisionService
from demo.vision_weights import DEFAULT_MODEL, SPECS, TASKS, Task, VisionConfig

SIZE = (224, 160)  # small and not square, so width/height mix-ups show


def random_state_dict(task: str, seed: int, name: str | None = None) -> dict[str, torch.Tensor]:
    """A random-init state dict of the task's architecture.

    For the detectors the box-head weights are redrawn wider: with torchvision's own init every class gets
    about 1/91 and no box survives the usual score floor, so thresholds could not be tested.
    """
    torch.manual_seed(seed)
    model = SPECS[task][name or DEFAULT_MODEL[task]].build()
    head = getattr(model, "roi_heads", None) or getattr(model, "head", None)
    if task == "detector" and head is not None:
        with torch.no_grad():
            for parameter in head.parameters():
                parameter.normal_(0.0, 0.2)
    return {key: value.clone().contiguous() for key, value in model.state_dict().items()}


def write_random_weights(folder: Path, seed: int = 0) -> dict[Task, Path]:
    """`detector.safetensors` and `segmenter.safetensors` of the default architectures in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: dict[Task, Path] = {}
    for task in TASKS:
        paths[task] = folder / f"{task}.safetensors"
        save_file(random_state_dict(task, seed), str(paths[task]))
    return paths


def random_vision_service(folder: Path) -> VisionService:
    """A service on freshly written random weights in `folder`, keeping every box (score floor 0)."""
    paths = write_random_weights(folder)
    config = VisionConfig(
        detector_weights=paths["detector"],
        segmenter_weights=paths["segmenter"],
        allow_download=False,
        hub_dir=folder / "hub",
        min_score=0.0,
    )
    return VisionService(config)


def offline_vision(root: Path) -> VisionService:
    """A service that has no weights anywhere and may not download: the tabs' "unavailable" state."""
    return VisionService(
        VisionConfig(weights_dir=root / "weights", hub_dir=root / "hub", allow_download=False)
    )
