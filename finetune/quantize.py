"""INT8 post-training quantization of a run's ONNX export: calibrated on real images, checked against FP32.

    python -m finetune.export RUN_DIR --int8     # writes model.int8.onnx beside model.onnx, with its check
    python app.py --checkpoint RUN_DIR --runtime onnx-int8

Why: on CPUs with 8-bit dot-product instructions (AVX-512 VNNI, AVX-VNNI, ARM dotprod) ONNX Runtime runs an
INT8 EfficientNet-Lite about 2x faster than FP32 (`bench/serve.py` here: 2.9 ms against 5.8 ms at batch 1,
two cores), and the FP32 model already runs near these cores' FP32 peak, so lower precision is the only big
step left. Why opt-in: quantization moves probabilities. Confident predictions keep their top-1 (in an
experiment on 231 crops of packaged photos, all 71 that FP32 gave >= 0.5 did), but on ambiguous images close
classes can change places, so the exact FP32 export stays the default and INT8 is written only after a check:

- calibration: static QDQ quantization (per-channel INT8 weights, UINT8 activations, min-max ranges) on up to
  `MAX_CALIBRATION` training images of the run's recorded split (split.json), round-robin over classes, when
  those files are still where and as they were; otherwise on zoomed and mirrored views of the check photos;
- check: top-1 agreement with the FP32 export on up to `MAX_CHECK` held-out validation images (and the
  top-1 accuracy of both, since their labels are known), or on the original photos; below
  `MIN_TOP1_AGREEMENT`, or more than `MAX_ACCURACY_DROP` accuracy lost, nothing is written.
- a multi-label run (a labels CSV) is calibrated and checked on its CSV split the same way, and judged on
  what it answers: the set of labels at or above their fitted thresholds (the same set on an image counts as
  agreement) and micro-F1 against the known labels in place of top-1 accuracy.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps

from finetune.checkpoint import LoadedRun
from finetune.cpu_features import NO_INT8_DOT_PRODUCT, has_int8_dot_product
from finetune.data import Sample
from finetune.errors import CheckpointError, ImageError, RuntimeUnavailableError, StudioError
from finetune.file_predict import open_files
from finetune.images import open_image
from finetune.inference import (
    META_PRECISION,
    OnnxClassifier,
    ParityReport,
    available_cores,
    compare_runtimes,
    has_module,
)
from finetune.labels_csv import read_csv_split
from finetune.multilabel import is_multilabel, multilabel_report, summary, thresholds_of
from finetune.split import SPLIT_FILE, read_split

logger = logging.getLogger(__name__)

INT8_FILE = "model.int8.onnx"
META_INT8_CHECK = "studio.int8_check"
MAX_CALIBRATION = 64
MAX_CHECK = 256
VIEWS_PER_PHOTO = 6  # calibration views of each photo when the run's own images are not available
MIN_TOP1_AGREEMENT = 0.97
MAX_ACCURACY_DROP = 0.01


@dataclass
class QuantizationImages:
    """Images to calibrate on and held-out images to check with (labels when they are known)."""

    calibration: list[Image.Image]
    check: list[Image.Image]
    check_targets: list[int] | list[tuple[int, ...]] | None  # a multi-label run: label indices per image
    source: str


@dataclass
class Int8Report:
    """How the INT8 model compares with the FP32 export on the check images."""

    source: str
    n_calibration: int
    n_images: int
    top1_agree: int
    max_prob_diff: float
    fp32_top1: float | None = None  # accuracy on labelled check images (multi-label: micro-F1)
    int8_top1: float | None = None
    answer: str = "top-1"  # what must agree: "top-1", or "labels" (the set above thresholds, multi-label)

    @property
    def agreement(self) -> float:
        return self.top1_agree / max(1, self.n_images)

    def summary(self) -> str:
        text = (
            f"same {self.answer} as FP32 on {self.top1_agree}/{self.n_images} {self.source} "
            f"({self.agreement:.1%}), max probability difference {self.max_prob_diff:.2f}"
        )
        if self.fp32_top1 is not None and self.int8_top1 is not None:
            score = "micro-F1" if self.answer == "labels" else "top-1 accuracy"
            text += f"; {score} FP32 {self.fp32_top1:.4f}, INT8 {self.int8_top1:.4f}"
        return text


def quantization_images(run: LoadedRun, photos: Sequence[Image.Image], seed: int = 0) -> QuantizationImages:
    """The run's own train/validation images when its dataset is still on disk, else views of `photos`."""
    dataset = _run_dataset_images(run, seed)
    if dataset is not None:
        return dataset
    if not photos:
        raise ImageError("no images to calibrate INT8 with; pass --images with some of your photos.")
    rng = random.Random(seed)
    views = [_random_view(photo, rng) for photo in photos for _ in range(VIEWS_PER_PHOTO)]
    return QuantizationImages(
        calibration=views[:MAX_CALIBRATION],
        check=list(photos)[:MAX_CHECK],
        check_targets=None,
        source="check photos",
    )


def quantize_export(
    fp32: OnnxClassifier, path: Path, images: QuantizationImages, metadata: dict[str, str]
) -> Int8Report:
    """Quantize `fp32`'s model into `path` (a temporary file the caller renames) and check it.

    Raises CheckpointError when the check fails; the caller then writes nothing.
    """
    if not has_module("onnx"):
        raise RuntimeUnavailableError("INT8 quantization needs onnx: `pip install onnx`.")
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = fp32.preprocess(images.calibration).numpy()
    input_name = fp32.session.get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="studio-int8-") as tmp, _quiet_quantizer(), _as_unavailable(fp32):
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32.onnx_path), str(prepared))
        quantize_static(
            str(prepared),
            str(path),
            _CalibrationReader(input_name, calibration, batch_size=16),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            calibration_providers=["CPUExecutionProvider"],
        )
    int8 = OnnxClassifier(fp32.run, path, batch_size=fp32.batch_size)
    multi_label = is_multilabel(fp32.run.config)
    compare = compare_label_sets if multi_label else compare_runtimes
    parity = compare(fp32, int8, images.check, images.check_targets)
    report = Int8Report(
        source=images.source,
        n_calibration=len(images.calibration),
        n_images=parity.n_images,
        top1_agree=parity.top1_agree,
        max_prob_diff=parity.max_prob_diff,
        fp32_top1=parity.reference_top1,
        int8_top1=parity.candidate_top1,
        answer="labels" if multi_label else "top-1",
    )
    if report.agreement < MIN_TOP1_AGREEMENT or _accuracy_drop(report) > MAX_ACCURACY_DROP:
        cause = (
            f" ({NO_INT8_DOT_PRODUCT}: INT8 is for CPUs that have them)"
            if has_int8_dot_product() is False
            else ""
        )
        raise CheckpointError(
            f"INT8 quantization changes this model's answers too much ({report.summary()}; needs at least "
            f"{MIN_TOP1_AGREEMENT:.0%} agreement and at most {MAX_ACCURACY_DROP:.0%} accuracy lost), so "
            f"it was not written; serve the exact FP32 export with --runtime onnx{cause}."
        )
    _write_metadata(path, {**metadata, META_PRECISION: "int8", META_INT8_CHECK: json.dumps(asdict(report))})
    return report


def read_int8_report(classifier: OnnxClassifier) -> Int8Report | None:
    """The check that was stored in an INT8 file's metadata (None for FP32 files or unreadable metadata)."""
    try:
        return Int8Report(**json.loads(classifier.metadata[META_INT8_CHECK]))
    except (KeyError, TypeError, ValueError):
        return None


def compare_label_sets(
    reference: OnnxClassifier,
    candidate: OnnxClassifier,
    images: Sequence[Image.Image],
    targets: Sequence[Sequence[int]] | None = None,
) -> ParityReport:
    """`compare_runtimes` for a multi-label run: an image agrees when both answer the same set of labels
    (each at or above its fitted threshold); with known labels, each one's micro-F1 stands for accuracy."""
    thresholds = thresholds_of(reference.run.config, reference.run.labels)
    expected_probs = reference.predict_probs(images)
    actual_probs = candidate.predict_probs(images)
    expected, actual = expected_probs >= thresholds, actual_probs >= thresholds
    report = ParityReport(
        n_images=len(images),
        max_prob_diff=float(np.abs(expected_probs - actual_probs).max()),
        top1_agree=int((expected == actual).all(axis=1).sum()),
    )
    if targets is not None:
        truth = np.zeros_like(expected_probs)
        for row, labels in enumerate(targets):
            truth[row, list(labels)] = 1
        names = list(reference.run.labels)
        for probs, field_name in ((expected_probs, "reference_top1"), (actual_probs, "candidate_top1")):
            score = summary(multilabel_report(truth, probs, thresholds, names))["micro_f1"]
            setattr(report, field_name, score)
    return report


def _accuracy_drop(report: Int8Report) -> float:
    if report.fp32_top1 is None or report.int8_top1 is None:
        return 0.0
    return report.fp32_top1 - report.int8_top1


def _run_dataset_images(run: LoadedRun, seed: int) -> QuantizationImages | None:
    """Calibration images from the run's recorded training split, check images from its validation split.

    The split is read from the run's split.json, never recomputed from the folder (a file added since would
    move training images into the check); files changed or removed since training are left out. A labels-CSV
    run's split is taken round-robin over its strata (each image's rarest label), its targets are label sets.
    """
    multi_label = is_multilabel(run.config)
    record: Any = None
    if run.run_dir is not None:
        record = read_csv_split(run.run_dir) if multi_label else read_split(run.run_dir)
    if record is None:
        logger.info("The run has no recorded split (%s); calibrating on photos", SPLIT_FILE)
        return None
    recorded = record.split if multi_label else record
    if recorded.classes != list(run.labels):
        logger.info("The run's recorded split does not match its labels; calibrating on photos")
        return None
    if multi_label:
        train, val, folder = recorded.train, recorded.val, recorded.csv_path.parent
    else:
        train, val, folder = record.samples("train"), record.samples("val"), record.data_dir
    candidates = {
        "train": _round_robin(train, MAX_CALIBRATION, seed),
        "val": _round_robin(val, MAX_CHECK, seed),
    }
    kept = {subset: record.unchanged(samples) for subset, samples in candidates.items()}
    changed = sum(len(candidates[s]) - len(kept[s]) for s in candidates)
    if changed:
        logger.warning(
            "%d of the run's images changed or went missing since training (%s); the INT8 check uses only "
            "the unchanged ones", changed, folder,
        )  # fmt: skip
    with ThreadPoolExecutor(available_cores()) as pool:  # the prediction path's opener, on all cores
        train_images = open_files([sample.path for sample in kept["train"]], open_image, pool)
        val_images = open_files([sample.path for sample in kept["val"]], open_image, pool)
    # bad files were already reported when the run was trained; here they are only left out
    calibration = [image for image in train_images if isinstance(image, Image.Image)]
    checked = [
        (sample, image)
        for sample, image in zip(kept["val"], val_images, strict=True)
        if isinstance(image, Image.Image)
    ]
    if not calibration or not checked:
        logger.info("No unchanged images of the run's split are left in %s; using photos", folder)
        return None
    return QuantizationImages(
        calibration=calibration,
        check=[image for _, image in checked],
        check_targets=[sample.labels if multi_label else sample.target for sample, _ in checked],
        source="held-out validation images",
    )


def _round_robin(samples: Sequence[Sample], limit: int, seed: int) -> list[Sample]:
    """Up to `limit` samples taking one class after another, so small classes are represented too."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.target, []).append(sample)
    rng = random.Random(seed)
    for members in by_class.values():
        rng.shuffle(members)
    chosen: list[Sample] = []
    queues = [iter(by_class[target]) for target in sorted(by_class)]
    while queues and len(chosen) < limit:
        for queue in list(queues):
            sample = next(queue, None)
            if sample is None:
                queues.remove(queue)
            elif len(chosen) < limit:
                chosen.append(sample)
    return chosen


def _random_view(photo: Image.Image, rng: random.Random) -> Image.Image:
    """A random crop covering 30-100% of each side, mirrored half of the time."""
    width, height = photo.size
    scale = rng.uniform(0.3, 1.0)
    crop_w, crop_h = max(1, int(width * scale)), max(1, int(height * scale))
    left, top = rng.randint(0, width - crop_w), rng.randint(0, height - crop_h)
    view = photo.crop((left, top, left + crop_w, top + crop_h))
    return ImageOps.mirror(view) if rng.random() < 0.5 else view


class _CalibrationReader:
    """ONNX Runtime's calibration data reader protocol over a preprocessed float32 batch."""

    def __init__(self, input_name: str, batch: np.ndarray, batch_size: int) -> None:
        self._feeds = iter(
            [{input_name: batch[start : start + batch_size]} for start in range(0, len(batch), batch_size)]
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def _write_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    existing = {entry.key: entry for entry in model.metadata_props}
    for key, value in metadata.items():
        if key in existing:
            existing[key].value = value
        else:
            entry = model.metadata_props.add()
            entry.key, entry.value = key, value
    onnx.save(model, str(path))


@contextlib.contextmanager
def _as_unavailable(fp32: OnnxClassifier) -> Iterator[None]:
    """The quantizer raises many types for graphs it cannot handle; users get one message and a way out."""
    try:
        yield
    except (StudioError, OSError):
        raise
    except Exception as error:
        first_line = str(error).splitlines()[0][:300] if str(error) else ""
        raise RuntimeUnavailableError(
            f"{fp32.run.architecture} cannot be quantized to INT8 ({type(error).__name__}: {first_line}); "
            "serve the FP32 export with --runtime onnx."
        ) from error


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantizer logs advice and progress meant for its developers; users only need errors."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # onnxruntime.quantization logs through the root logger
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)
