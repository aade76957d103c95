"""Which torchvision detector and segmenter the vision tabs use, and where their real weights come from.

Weights are looked for in one order: an explicit local file, a file with the official name in the weights
folder, the torch hub cache (where torchvision keeps what `weights=` downloaded), then torchvision's own
download. When none can be had, `WeightsUnavailableError` says which file to place in which folder and which
switch hides the tabs; a model is never built without a real state dict, so random-weight output can never
pass for a prediction. Class names come from the weights enum's metadata, which ships inside torchvision.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import torch
from torchvision.models import WeightsEnum, detection, segmentation

from finetune.errors import CheckpointError, ConfigError, WeightsUnavailableError
from finetune.modeling import read_state_dict_file

logger = logging.getLogger(__name__)

Task = Literal["detector", "segmenter"]
TASKS: tuple[Task, ...] = ("detector", "segmenter")
OFF_VALUES = ("0", "off", "false", "no")

# Switches, shared by the app's flags, the README and the error messages.
ENV_TABS = "VISION_TABS"  # "off" hides the Detect and Segment tabs
ENV_WEIGHTS_DIR = "VISION_WEIGHTS_DIR"
ENV_WEIGHTS = {"detector": "VISION_DETECTOR_WEIGHTS", "segmenter": "VISION_SEGMENTER_WEIGHTS"}
ENV_MODEL = {"detector": "VISION_DETECTOR", "segmenter": "VISION_SEGMENTER"}
ENV_DOWNLOAD = "VISION_DOWNLOAD"  # "off" never downloads (HF_HUB_OFFLINE=1 does the same)
FLAG_OFF = "--no-vision"
FLAG_WEIGHTS_DIR = "--vision-weights-dir"
FLAG_WEIGHTS = {"detector": "--detector-weights", "segmenter": "--segmenter-weights"}


@dataclass(frozen=True)
class ModelSpec:
    """A torchvision architecture and the weights enum that names its file, URL and categories."""

    builder: Callable[..., torch.nn.Module]
    weights: WeightsEnum
    kwargs: Mapping[str, Any] = field(
        default_factory=dict
    )  # what `weights=` switches on (deeplab's aux head)

    @property
    def file_name(self) -> str:
        """The official file name, as torchvision stores it in the torch hub cache."""
        return Path(urlparse(self.weights.url).path).name

    @property
    def categories(self) -> list[str]:
        return list(self.weights.meta["categories"])

    @property
    def size_mb(self) -> float:
        return float(self.weights.meta.get("_file_size", math.nan))

    def build(self) -> torch.nn.Module:
        """The bare architecture, exactly as `weights=None, weights_backbone=None` gives it."""
        return self.builder(
            weights=None, weights_backbone=None, num_classes=len(self.categories), **self.kwargs
        )


DETECTORS = {  # COCO; the 320 px Faster R-CNN is the CPU default (22.8 box mAP for ~0.7 GFLOPs)
    "fasterrcnn_mobilenet_v3_large_320_fpn": ModelSpec(
        detection.fasterrcnn_mobilenet_v3_large_320_fpn,
        detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights.COCO_V1,
    ),
    "fasterrcnn_mobilenet_v3_large_fpn": ModelSpec(  # 32.8 mAP, ~6x the compute
        detection.fasterrcnn_mobilenet_v3_large_fpn,
        detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights.COCO_V1,
    ),
    "ssdlite320_mobilenet_v3_large": ModelSpec(  # 21.3 mAP, the smallest file (13 MB)
        detection.ssdlite320_mobilenet_v3_large, detection.SSDLite320_MobileNet_V3_Large_Weights.COCO_V1
    ),
}
SEGMENTERS = {  # the 20 PASCAL VOC classes + background, trained on COCO; LR-ASPP is the CPU default
    "lraspp_mobilenet_v3_large": ModelSpec(
        segmentation.lraspp_mobilenet_v3_large,
        segmentation.LRASPP_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
    ),
    "deeplabv3_mobilenet_v3_large": ModelSpec(
        segmentation.deeplabv3_mobilenet_v3_large,
        segmentation.DeepLabV3_MobileNet_V3_Large_Weights.COCO_WITH_VOC_LABELS_V1,
        {"aux_loss": True},
    ),
}
SPECS: dict[Task, dict[str, ModelSpec]] = {"detector": DETECTORS, "segmenter": SEGMENTERS}
DEFAULT_MODEL: dict[Task, str] = {
    "detector": "fasterrcnn_mobilenet_v3_large_320_fpn",
    "segmenter": "lraspp_mobilenet_v3_large",
}


@dataclass
class VisionConfig:
    """Whether the vision tabs exist and where their weights come from; built from flags and env vars."""

    is_enabled: bool = True  # False: the app builds no Detect/Segment tabs (a lean Space)
    weights_dir: Path | None = None  # folder searched for the official file names (`ModelSpec.file_name`)
    detector_weights: Path | None = None  # explicit detector file: .pth state dict or .safetensors
    segmenter_weights: Path | None = None  # explicit segmenter file
    allow_download: bool = True  # let torchvision download into the torch hub cache if nothing is local
    hub_dir: Path | None = None  # torch hub folder; None means torch.hub.get_dir() when looking
    detector: str = DEFAULT_MODEL["detector"]
    segmenter: str = DEFAULT_MODEL["segmenter"]
    min_score: float = 0.05  # the detector itself drops boxes below this (torchvision's default)

    def __post_init__(self) -> None:
        for task in TASKS:
            name = getattr(self, task)
            if name not in SPECS[task]:
                raise ConfigError(f"unknown {task} '{name}'; choose one of {', '.join(SPECS[task])}.")
        for key in ("weights_dir", "detector_weights", "segmenter_weights", "hub_dir"):
            if getattr(self, key) is not None:
                setattr(self, key, Path(getattr(self, key)).expanduser())
        check_fraction("min_score", self.min_score)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> VisionConfig:
        """Settings from the VISION_* variables and HF_HUB_OFFLINE; non-None `overrides` (flags) win."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {
            "is_enabled": env.get(ENV_TABS, "on").strip().lower() not in OFF_VALUES,
            "allow_download": env.get(ENV_DOWNLOAD, "on").strip().lower() not in OFF_VALUES
            and env.get("HF_HUB_OFFLINE", "0").strip().lower() in ("", *OFF_VALUES),
        }
        if env.get(ENV_WEIGHTS_DIR):
            values["weights_dir"] = env[ENV_WEIGHTS_DIR]
        for task in TASKS:
            if env.get(ENV_WEIGHTS[task]):
                values[f"{task}_weights"] = env[ENV_WEIGHTS[task]]
            if env.get(ENV_MODEL[task]):
                values[task] = env[ENV_MODEL[task]]
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def spec(self, task: Task) -> ModelSpec:
        return SPECS[task][getattr(self, task)]

    def hub_checkpoints(self) -> Path:
        """torch hub's checkpoint folder, where torchvision's `weights=` download puts and finds files."""
        return (self.hub_dir or Path(torch.hub.get_dir())) / "checkpoints"


@dataclass(frozen=True)
class WeightsStatus:
    """Where a task's weights would come from, found without loading anything or touching the network."""

    task: Task
    model_name: str
    source: Literal["file", "cache", "download", "missing"]
    location: str  # a path, or the URL for "download"
    message: str  # one sentence for the tab: where the weights come from, or what to do

    @property
    def is_available(self) -> bool:
        return self.source != "missing"


@dataclass
class LoadedModel:
    """A model in eval mode with real weights, and where they came from (shown with every result)."""

    model: torch.nn.Module
    name: str
    spec: ModelSpec
    source: str  # "file:PATH", "cache:PATH" or "download:URL"


def weights_status(config: VisionConfig, task: Task) -> WeightsStatus:
    """Where the weights would come from: explicit file > weights folder > hub cache > download."""
    name, spec = getattr(config, task), config.spec(task)
    explicit: Path | None = getattr(config, f"{task}_weights")
    if explicit is not None:
        if explicit.is_file():
            return WeightsStatus(task, name, "file", str(explicit), f"{name} weights from file '{explicit}'.")
        message = (
            f"the {task} weights file '{explicit}' does not exist; fix {FLAG_WEIGHTS[task]} / "
            f"{ENV_WEIGHTS[task]}, or leave it unset to look for '{spec.file_name}'."
        )
        return WeightsStatus(task, name, "missing", str(explicit), message)
    folder = config.weights_dir
    for path in (
        [folder / spec.file_name, folder / f"{Path(spec.file_name).stem}.safetensors"] if folder else []
    ):
        if path.is_file():
            return WeightsStatus(task, name, "file", str(path), f"{name} weights from file '{path}'.")
    cached = config.hub_checkpoints() / spec.file_name
    if cached.is_file():
        message = f"{name} weights from the torch hub cache '{cached}'."
        return WeightsStatus(task, name, "cache", str(cached), message)
    if config.allow_download:
        message = (
            f"{name} weights ({spec.size_mb:.0f} MB) will be downloaded from {spec.weights.url} into "
            f"'{cached.parent}' on first use."
        )
        return WeightsStatus(task, name, "download", spec.weights.url, message)
    return WeightsStatus(task, name, "missing", str(cached), missing_message(config, task))


def load_model(config: VisionConfig, task: Task) -> LoadedModel:
    """Build the task's model and load real weights into it, or raise `WeightsUnavailableError`."""
    status, spec = weights_status(config, task), config.spec(task)
    if not status.is_available:
        raise WeightsUnavailableError(status.message)
    if status.source == "download":
        state_dict = _download(config, task)
    else:
        state_dict = read_state_dict_file(Path(status.location))
    model = spec.build()
    _load_state_dict(model, state_dict, f"{status.source} '{status.location}'", status.model_name)
    if hasattr(model, "aux_classifier"):
        model.aux_classifier = None  # deeplab's training-only head: loaded for a strict fit, never run
    owner = getattr(model, "roi_heads", model)  # Faster R-CNN keeps its score floor there, SSD on itself
    if hasattr(owner, "score_thresh"):
        owner.score_thresh = config.min_score
    loaded = LoadedModel(model.eval(), status.model_name, spec, f"{status.source}:{status.location}")
    logger.info("Loaded %s with weights from %s.", status.model_name, loaded.source)
    return loaded


def missing_message(config: VisionConfig, task: Task) -> str:
    """What to place where, or which switch to use, when no weights can be had."""
    spec, name = config.spec(task), getattr(config, task)
    folders = [config.weights_dir] if config.weights_dir else []
    where = " or ".join(f"'{folder}'" for folder in [*folders, config.hub_checkpoints()])
    return (
        f"No weights for the {task} {name} are available offline. Place the file '{spec.file_name}' "
        f"({spec.size_mb:.0f} MB, from {spec.weights.url}) in {where}, point {FLAG_WEIGHTS[task]} / "
        f"{ENV_WEIGHTS[task]} at a copy, or set {FLAG_WEIGHTS_DIR} / {ENV_WEIGHTS_DIR} to its folder; "
        f"online, torchvision downloads it. To hide the Detect and Segment tabs, start with {FLAG_OFF} or "
        f"set {ENV_TABS}=off."
    )


def check_fraction(name: str, value: float) -> None:
    """Thresholds and opacities come from sliders and API callers; refuse anything outside [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name} must be a number between 0 and 1, got {value!r}.")


def _download(config: VisionConfig, task: Task) -> dict[str, torch.Tensor]:
    """torchvision's own download (what `weights=` does): hash-checked, kept in the hub cache."""
    spec, folder = config.spec(task), config.hub_checkpoints()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return spec.weights.get_state_dict(
            model_dir=str(folder), map_location="cpu", progress=False, check_hash=True, weights_only=True
        )
    except Exception as error:  # DNS, proxy, HTTP and hash failures all mean "no weights" to the user
        reason = f"{type(error).__name__}: {str(error)[:200]}"
        raise WeightsUnavailableError(
            f"downloading {spec.weights.url} failed ({reason}). {missing_message(config, task)}"
        ) from error


def _load_state_dict(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], origin: str, name: str
) -> None:
    """Load strictly, except BatchNorm's `num_batches_tracked`, which eval mode never reads.

    torchvision builds the trained Faster R-CNN with FrozenBatchNorm2d (no such buffer); the bare build has
    BatchNorm2d, which computes the same thing in eval mode with the same eps.
    """
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as error:  # tensors of another shape
        raise CheckpointError(f"{origin} does not fit {name}: {str(error)[:300]}") from error
    problems = [
        key for key in [*result.missing_keys, *result.unexpected_keys] if "num_batches_tracked" not in key
    ]
    if problems:
        raise CheckpointError(
            f"{origin} does not fit {name}: {len(problems)} tensors missing or unexpected (first: "
            f"{problems[0]}). Is it for another architecture?"
        )
