"""Object detection and semantic segmentation for the app: `VisionService`, its results and their drawing.

`VisionService` is what the Detect and Segment tabs call (no gradio here). It loads each model on first use,
once, under a lock that also serialises inference (`vision_weights` decides where the real weights come from
and refuses to run without them), runs it under `torch.inference_mode()` and returns plain dataclasses with
everything the tabs show: the annotated image, the boxes or the mask, and where the weights came from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFont
from torchvision.transforms.functional import pil_to_tensor, to_pil_image
from torchvision.utils import draw_bounding_boxes

from demo.vision_weights import (
    ENV_TABS,
    FLAG_OFF,
    TASKS,
    LoadedModel,
    Task,
    VisionConfig,
    WeightsStatus,
    check_fraction,
    load_model,
    weights_status,
)
from finetune.errors import ConfigError
from finetune.images import UPLOAD_LIMITS, ImageSource, open_image

# detection inputs are shrunk to this first; every detector here resizes below it anyway
MODEL_MAX_SIDE = 1333


@dataclass
class Detection:
    """One box in the input image's own pixel coordinates."""

    label: str
    score: float
    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    class_id: int

    def as_dict(self) -> dict[str, Any]:
        return {"label": self.label, "score": round(self.score, 4), "box": [round(v, 1) for v in self.box]}


@dataclass
class DetectionResult:
    """Detections at one threshold, drawn on the input; keeps all candidates so the threshold can move."""

    image: Image.Image  # the input with the kept boxes drawn, same size as the input
    detections: list[Detection]  # score >= threshold, best first
    threshold: float
    model_name: str
    weights_source: str
    source: Image.Image = field(repr=False)  # the clean input
    candidates: list[Detection] = field(repr=False)  # all the model returned (score >= min_score)

    def with_threshold(self, threshold: float) -> DetectionResult:
        """The same detections at another threshold, without running the model again."""
        return make_detection_result(
            self.source, self.candidates, threshold, self.model_name, self.weights_source
        )

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary for downloads and API users."""
        return {
            "model": self.model_name,
            "weights": self.weights_source,
            "threshold": self.threshold,
            "image_size": list(self.source.size),
            "detections": [detection.as_dict() for detection in self.detections],
        }


@dataclass
class ClassShare:
    """One class present in a segmentation mask and the fraction of pixels it covers."""

    class_id: int
    label: str
    share: float  # 0..1 of all pixels
    color: tuple[int, int, int]


@dataclass
class SegmentationResult:
    """A per-pixel class mask of the input and its legend; `overlay()` draws it at any opacity."""

    image: Image.Image  # the input, RGB
    mask: np.ndarray = field(repr=False)  # (height, width) class ids, same size as the input
    legend: list[ClassShare]  # classes present, largest first (background included)
    model_name: str
    weights_source: str

    def overlay(self, opacity: float = 0.6) -> Image.Image:
        """The input with every non-background pixel tinted by its class colour; opacity 0 is the input."""
        check_fraction("opacity", opacity)
        palette = np.array([class_color(index) for index in range(256)], dtype=np.float32)
        alpha = (self.mask != 0)[..., None] * np.float32(opacity)
        pixels = np.asarray(self.image, dtype=np.float32)
        blended = pixels * (1 - alpha) + palette[self.mask] * alpha
        return Image.fromarray(np.rint(blended).astype(np.uint8))


class VisionService:
    """Detection and segmentation for the app: config, lazy thread-safe model loading and inference."""

    def __init__(self, config: VisionConfig | None = None) -> None:
        self.config = config or VisionConfig()
        self._locks = {task: threading.Lock() for task in TASKS}  # one per model: loading and inference
        self._loaded: dict[Task, LoadedModel] = {}

    @property
    def is_enabled(self) -> bool:
        return self.config.is_enabled

    @property
    def min_score(self) -> float:
        return self.config.min_score

    def weights_status(self, task: Task) -> WeightsStatus:
        """Where the task's weights would come from; cheap (file checks only), for the tab's status line."""
        return weights_status(self.config, task)

    def model(self, task: Task) -> torch.nn.Module:
        """The loaded model, loading it on the first call; for warm-up and for checks."""
        with self._locks[task]:
            return self._load(task).model

    def detect(self, image: ImageSource, threshold: float = 0.5) -> DetectionResult:
        """Boxes with score >= `threshold` in `image`, drawn on it; class names are COCO's."""
        check_fraction("threshold", threshold)
        picture = open_image(image, limits=UPLOAD_LIMITS)
        small = picture.copy()
        small.thumbnail((MODEL_MAX_SIDE, MODEL_MAX_SIDE))
        with self._locks["detector"]:
            loaded = self._load("detector")
            with torch.inference_mode():
                output = loaded.model([loaded.spec.weights.transforms()(small)])[0]
        scale = torch.tensor([picture.width / small.width, picture.height / small.height] * 2)
        limit = torch.tensor([picture.width, picture.height] * 2, dtype=torch.float32)
        boxes = torch.minimum((output["boxes"] * scale).clamp(min=0), limit)
        categories = loaded.spec.categories
        candidates = [
            Detection(display_name(categories[int(label)]), float(score), tuple(box.tolist()), int(label))
            for box, label, score in zip(boxes, output["labels"], output["scores"], strict=True)
        ]
        candidates.sort(key=lambda detection: -detection.score)
        return make_detection_result(picture, candidates, threshold, loaded.name, loaded.source)

    def segment(self, image: ImageSource) -> SegmentationResult:
        """A class id for every pixel of `image` (PASCAL VOC classes) and the share of each class present."""
        picture = open_image(image, limits=UPLOAD_LIMITS)
        with self._locks["segmenter"]:
            loaded = self._load("segmenter")
            with torch.inference_mode():
                logits = loaded.model(loaded.spec.weights.transforms()(picture).unsqueeze(0))["out"][0]
        # argmax at the model's resolution, then nearest-neighbour up: full-size logits of a big photo would
        # need gigabytes for little visible gain
        classes = Image.fromarray(logits.argmax(0).to(torch.uint8).numpy())
        mask = np.asarray(classes.resize(picture.size, Image.Resampling.NEAREST))
        legend = class_shares(mask, loaded.spec.categories)
        return SegmentationResult(picture, mask, legend, loaded.name, loaded.source)

    def _load(self, task: Task) -> LoadedModel:
        """The task's model, built on first use; the caller holds the task's lock. Failures are not cached,
        so a weights file placed after a failed click is picked up on the next one."""
        if task not in self._loaded:
            if not self.is_enabled:
                raise ConfigError(f"detection and segmentation are turned off ({FLAG_OFF} / {ENV_TABS}=off).")
            self._loaded[task] = load_model(self.config, task)
        return self._loaded[task]


def make_detection_result(
    source: Image.Image, candidates: list[Detection], threshold: float, model_name: str, weights_source: str
) -> DetectionResult:
    """Keep the candidates at or above `threshold` and draw them."""
    check_fraction("threshold", threshold)
    kept = [detection for detection in candidates if detection.score >= threshold]
    return DetectionResult(
        draw_detections(source, kept), kept, threshold, model_name, weights_source, source, candidates
    )


def draw_detections(image: Image.Image, detections: list[Detection]) -> Image.Image:
    """Boxes and "label score" tags in class colours (torchvision's `draw_bounding_boxes`), sized to fit."""
    if not detections:
        return image.copy()
    font = _label_font()
    size = max(image.size)
    colors = [class_color(detection.class_id) for detection in detections]
    drawn = draw_bounding_boxes(
        pil_to_tensor(image),
        torch.tensor([detection.box for detection in detections], dtype=torch.float32),
        labels=[f"{detection.label} {detection.score:.2f}" for detection in detections],
        colors=colors,
        width=max(2, size // 320),
        font=font,
        font_size=max(12, size // 50) if font else None,
        fill_labels=True,
        label_colors=[_text_color(color) for color in colors],
    )
    return to_pil_image(drawn)


def class_shares(mask: np.ndarray, categories: list[str]) -> list[ClassShare]:
    """The classes present in `mask` with the fraction of pixels each covers, largest first."""
    counts = np.bincount(mask.ravel(), minlength=len(categories))
    total = max(1, int(mask.size))
    present = sorted(np.flatnonzero(counts), key=lambda index: (-counts[index], index))
    return [
        ClassShare(
            int(index), display_name(categories[index]), float(counts[index] / total), class_color(int(index))
        )
        for index in present
    ]


def class_color(class_id: int) -> tuple[int, int, int]:
    """PASCAL VOC's colour map (the id's bits spread over R, G, B): stable, distinct, background is black."""
    red = green = blue = 0
    for bit in range(7, -1, -1):
        red |= (class_id & 1) << bit
        green |= ((class_id >> 1) & 1) << bit
        blue |= ((class_id >> 2) & 1) << bit
        class_id >>= 3
    return red, green, blue


def display_name(category: str) -> str:
    """torchvision's `__background__` reads as "background"."""
    return category.strip("_") if category.startswith("__") else category


def _text_color(background: tuple[int, int, int]) -> tuple[int, int, int]:
    luminance = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return (0, 0, 0) if luminance > 140 else (255, 255, 255)


@cache
def _label_font() -> str | None:
    """DejaVu Sans where installed (readable at any size); otherwise PIL's small built-in font."""
    try:
        ImageFont.truetype("DejaVuSans.ttf", 12)
    except OSError:
        return None
    return "DejaVuSans.ttf"
