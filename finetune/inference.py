"""Batched inference on a loaded run, on PyTorch or ONNX Runtime: preprocessing, probabilities, top-k, once.

`finetune.predict`, `finetune.evaluate` and the app's service all classify through a `Classifier` made by
`finetune.runtime.create_classifier(run, runtime)` (it knows how files are exported; this module does not),
and files through `finetune.file_predict.classify_files`, so both runtimes share one preprocessing path (the
run's own resize and crop from `modeling.split_eval_transform`, normalised straight into one float32 batch),
one label order and one way of reporting top-k; they differ only in what computes the logits.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from finetune.checkpoint import LoadedRun
from finetune.errors import CheckpointError, ConfigError, RuntimeUnavailableError
from finetune.images import ImageSource, open_image
from finetune.modeling import draft_size_for, split_eval_transform
from finetune.multilabel import is_multilabel, sigmoid
from finetune.trust import FALLBACK_MIN_CONFIDENCE, LogitsAndFeatures, read_trust

logger = logging.getLogger(__name__)

RUNTIMES = ("auto", "onnx", "onnx-int8", "torch")
DEFAULT_RUN = "default"  # checkpoint name of the embedded ImageNet tf_efficientnet_lite0
DEFAULT_TTA_SCALES = (1.0, 0.875, 1.15)  # zoom factors of the test-time views; 1.0 is the plain eval view
ONNX_INSTALL_HINT = "`pip install onnxruntime` (or onnxruntime-gpu), or choose --runtime torch"
META_PRECISION = "studio.precision"  # ONNX metadata: "int8" for quantized exports, absent (FP32) otherwise


@dataclass
class Prediction:
    """Top-k of one image: labels and probabilities, best first."""

    labels: list[str]
    probs: list[float]
    ood_score: float | None = None  # higher = further from the training classes; None: the run has no rule
    unknown: bool | None = None  # True: "not one of the classes"; None: rejection is off or unavailable

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def as_dict(self) -> dict[str, float]:
        """`{label: prob}`, the shape `gr.Label` expects."""
        return dict(zip(self.labels, self.probs, strict=True))


def top_k(
    probs: np.ndarray,
    labels: Sequence[str],
    k: int,
    ood_scores: np.ndarray | None = None,
    unknown: np.ndarray | None = None,
) -> list[Prediction]:
    """Top-k predictions for each row of an (N, C) probability array, with each row's OOD verdict if given."""
    k = max(1, min(int(k), probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        Prediction(
            labels=[labels[i] for i in row],
            probs=[float(p) for p in probs[n, row]],
            ood_score=None if ood_scores is None else float(ood_scores[n]),
            unknown=None if unknown is None else bool(unknown[n]),
        )
        for n, row in enumerate(order)
    ]


@dataclass
class Scores:
    """A batch's calibrated probabilities (N, C) and, when the run has an OOD rule, scores and verdicts."""

    probs: np.ndarray
    ood_scores: np.ndarray | None = None  # higher = further from the training classes
    unknown: np.ndarray | None = None  # bool per image; None when rejection is off
    logits: np.ndarray | None = None  # raw logits (averaged over zooms), for calibration reports

    def top_k(self, labels: Sequence[str], k: int) -> list[Prediction]:
        return top_k(self.probs, labels, k, self.ood_scores, self.unknown)

    def rows(self) -> list[Scores]:
        """One `Scores` of one image per row (the app's request batcher hands each request its own)."""
        return [
            Scores(
                self.probs[n : n + 1],
                None if self.ood_scores is None else self.ood_scores[n : n + 1],
                None if self.unknown is None else self.unknown[n : n + 1],
                None if self.logits is None else self.logits[n : n + 1],
            )
            for n in range(len(self.probs))
        ]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS tells)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        return os.cpu_count() or 1


def parse_tta(text: str | None) -> tuple[float, ...] | None:
    """`--tta` value: None or "" -> no TTA, "default" -> DEFAULT_TTA_SCALES, "1,0.875,1.15" -> those zooms."""
    if text is None or text == "":
        return None
    if text == "default":
        return DEFAULT_TTA_SCALES
    try:
        scales = tuple(float(part) for part in text.split(","))
    except ValueError:
        scales = ()
    if not scales or not all(0.25 <= scale <= 4.0 for scale in scales):
        raise ConfigError(
            f"invalid --tta '{text}'; give 'default' or comma-separated zoom factors between 0.25 and 4 "
            "such as '1,0.875,1.15' (1 is the plain view)."
        )
    return scales


class Classifier:
    """Runs a `LoadedRun` in PyTorch; thread-safe, because one instance serves all of the app's requests."""

    runtime = "torch"

    def __init__(self, run: LoadedRun, batch_size: int = 32) -> None:
        self.run = run
        self.labels = run.labels
        self.batch_size = batch_size
        self.draft_size = draft_size_for(run.data_config)
        _, self._height, self._width = run.data_config["input_size"]
        geometry, mean, std = split_eval_transform(run.data_config)
        self._views: dict[float, Any] = {1.0: geometry}
        # ToTensor's /255 and Normalize folded into one multiply-subtract on the uint8 pixels
        std_array = np.asarray(std, np.float32).reshape(3, 1, 1)
        self._scale = 1.0 / (255.0 * std_array)
        self._shift = np.asarray(mean, np.float32).reshape(3, 1, 1) / std_array
        self._lock = threading.Lock()
        # temperature and "none of these" rule from config.json (finetune.trust); every runtime applies them
        width = getattr(run.model, "head_hidden_size", None) or getattr(run.model, "num_features", 0)
        shape = (len(run.labels), int(width))  # what `LogitsAndFeatures` returns (timm's pre-logits size)
        self.trust = read_trust(run.config, run.run_dir.name if run.run_dir else run.architecture, shape)
        self.reject = self.trust.rejector is not None  # callers may turn it off (--no-reject)
        self._net = LogitsAndFeatures(run.model)
        self.is_multilabel = is_multilabel(run.config)  # independent sigmoid probabilities, not softmax

    def set_reject(self, reject: bool | None) -> None:
        """Rejection on (True), off (False: scores still computed) or as the run says (None: on when it has
        a fitted rule). On for a model without one, "unknown" means a top-1 probability below
        `finetune.trust.FALLBACK_MIN_CONFIDENCE`."""
        if reject and self.trust.rejector is None:
            self.trust = self.trust.with_fallback_rule()
            logger.info("No fitted 'none of these' rule for this model: unknown below %.0f%% confidence.",
                        100 * FALLBACK_MIN_CONFIDENCE)  # fmt: skip
        self.reject = self.trust.rejector is not None if reject is None else bool(reject)

    def open(self, source: ImageSource) -> Image.Image:
        """Open an image for this classifier: large JPEGs decode at reduced size (see `draft_size_for`)."""
        return open_image(source, draft_size=self.draft_size)

    def preprocess(self, images: Sequence[Image.Image], zoom: float = 1.0) -> torch.Tensor:
        """The run's eval resize and crop, normalised into one (N, 3, H, W) float32 batch.

        Equal to the run's timm transform (within float rounding) but without per-image tensors: one uint8
        copy out of PIL, then a single multiply-subtract written straight into the batch. `zoom` != 1 gives a
        test-time view (see `predict_probs`).
        """
        return self.normalize([self.view_pixels(image, zoom) for image in images])

    def view_pixels(self, image: Image.Image, zoom: float = 1.0) -> np.ndarray:
        """One image's eval resize and crop as (3, H, W) uint8: the per-image half of `preprocess`.

        Thread-safe, so `finetune.file_predict` runs it on the decoding threads, beside the forward pass.
        """
        if image.mode != "RGB":
            image = open_image(image)
        return np.asarray(self._view(zoom)(image)).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)

    def normalize(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """(3, H, W) uint8 views into one normalised (N, 3, H, W) float32 batch."""
        batch = np.empty((len(pixels), 3, self._height, self._width), np.float32)
        for out, view in zip(batch, pixels, strict=True):
            np.multiply(view, self._scale, out=out)
            out -= self._shift
        return torch.from_numpy(batch)

    def predict_logits(self, batch: torch.Tensor) -> np.ndarray:
        """Raw (uncalibrated) logits of an already preprocessed batch, in chunks of `batch_size`."""
        return self.predict_outputs(batch)[0]

    def predict_outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw logits and penultimate features of a preprocessed batch, from one pass per chunk."""
        logits, features = [], []
        with self._lock, torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                chunk_logits, chunk_features = self._net(batch[start : start + self.batch_size])
                logits.append(chunk_logits.float())
                features.append(chunk_features.float())
        if not logits:
            return np.zeros((0, len(self.labels)), np.float32), None
        return torch.cat(logits).numpy(), torch.cat(features).numpy()

    def predict_probs(self, images: Sequence[Image.Image], tta: Sequence[float] | None = None) -> np.ndarray:
        """Softmax probabilities, one row per image.

        `tta` (test-time augmentation) is a list of zoom factors: each image is also viewed with its crop
        zoomed in (> 1) or out (< 1, down to the whole shorter side); the views' probabilities are averaged.
        """
        zooms = tuple(tta) if tta else (1.0,)
        return self.predict_views([[self.view_pixels(image, zoom) for image in images] for zoom in zooms])

    def predict_views(self, views: Sequence[Sequence[np.ndarray]]) -> np.ndarray:
        """Softmax probabilities of `view_pixels` views (`views[z][n]`: image n, zoom z), zooms averaged."""
        return self.score_views(views).probs

    def score_views(self, views: Sequence[Sequence[np.ndarray]]) -> Scores:
        """Calibrated probabilities (softmax of logits / the run's temperature) and OOD scores of views
        (`views[z][n]`: image n, zoom z), both averaged over zooms; the one scoring step of every runtime."""
        count = len(views[0]) if views else 0
        if count == 0:
            return Scores(np.zeros((0, len(self.labels)), np.float32))
        batch = torch.cat([self.normalize(per_zoom) for per_zoom in views])
        logits, features = self.predict_outputs(batch)
        if self.is_multilabel:  # independent labels: no temperature or "none of these" rule
            probs = sigmoid(logits).reshape(len(views), count, -1).mean(axis=0)
            return Scores(probs, logits=logits.reshape(len(views), count, -1).mean(axis=0))
        probs = softmax(logits / self.trust.temperature).reshape(len(views), count, -1).mean(axis=0)
        mean_logits = logits.reshape(len(views), count, -1).mean(axis=0)
        rule = self.trust.rejector
        if rule is None or (rule.needs_features and features is None):
            return Scores(probs, logits=mean_logits)
        ood_scores = rule.score(logits, features).reshape(len(views), count).mean(axis=0)
        unknown = ood_scores > rule.threshold if self.reject else None
        return Scores(probs, ood_scores, unknown, mean_logits)

    def score_images(self, images: Sequence[Image.Image], tta: Sequence[float] | None = None) -> Scores:
        """`score_views` of PIL images (see `predict_probs` for `tta`)."""
        zooms = tuple(tta) if tta else (1.0,)
        return self.score_views([[self.view_pixels(image, zoom) for image in images] for zoom in zooms])

    def predict(
        self, images: Sequence[Image.Image], k: int = 5, tta: Sequence[float] | None = None
    ) -> list[Prediction]:
        """Top-k labels for each image."""
        return self.score_images(images, tta).top_k(self.labels, k)

    def _view(self, zoom: float) -> Any:
        """A zoomed view's resize and crop: the crop covers crop_pct / zoom of the shorter side (max 1)."""
        if zoom not in self._views:
            crop_pct = float(self.run.data_config.get("crop_pct") or 1.0)
            data_config = {**self.run.data_config, "crop_pct": min(1.0, crop_pct / zoom)}
            self._views[zoom] = split_eval_transform(data_config)[0]
        return self._views[zoom]


class OnnxClassifier(Classifier):
    """Runs the run's exported `model.onnx` in ONNX Runtime; same preprocessing, labels and outputs.

    `InferenceSession.run` is thread-safe, so concurrent requests need no lock (PyTorch's path keeps one).
    """

    runtime = "onnx"

    def __init__(
        self, run: LoadedRun, onnx_path: Path, batch_size: int = 32, threads: int | None = None
    ) -> None:
        super().__init__(run, batch_size)
        self.onnx_path = Path(onnx_path)
        self.session = create_session(self.onnx_path, threads)
        self._input_name = self.session.get_inputs()[0].name
        self.precision = self.metadata.get(META_PRECISION, "fp32")
        self.runtime = "onnx-int8" if self.precision == "int8" else "onnx"

    @property
    def metadata(self) -> dict[str, str]:
        """The `metadata_props` written at export (fingerprint, labels, data config)."""
        return dict(self.session.get_modelmeta().custom_metadata_map)

    def predict_outputs(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray | None]:
        array = batch.numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch, np.float32)
        outputs = [
            self.session.run(None, {self._input_name: array[start : start + self.batch_size]})
            for start in range(0, len(array), self.batch_size)
        ]
        if not outputs:
            return np.zeros((0, len(self.labels)), np.float32), None
        logits = np.concatenate([chunk[0] for chunk in outputs])
        has_features = all(len(chunk) > 1 for chunk in outputs)  # exports before EXPORT_FORMAT 2: logits only
        return logits, np.concatenate([chunk[1] for chunk in outputs]) if has_features else None


@dataclass
class ParityReport:
    """How closely one classifier reproduces another on some images (and, with labels, both accuracies)."""

    n_images: int
    max_prob_diff: float
    top1_agree: int
    reference_top1: float | None = None
    candidate_top1: float | None = None


def compare_runtimes(
    reference: Classifier,
    candidate: Classifier,
    images: Sequence[Image.Image],
    targets: Sequence[int] | None = None,
) -> ParityReport:
    """Max probability difference, top-1 agreement and (given `targets`) top-1 accuracy of both."""
    expected_probs = reference.predict_probs(images)
    actual_probs = candidate.predict_probs(images)
    expected, actual = expected_probs.argmax(axis=1), actual_probs.argmax(axis=1)
    report = ParityReport(
        n_images=len(images),
        max_prob_diff=float(np.abs(expected_probs - actual_probs).max()),
        top1_agree=int((expected == actual).sum()),
    )
    if targets is not None:
        report.reference_top1 = float((expected == np.asarray(targets)).mean())
        report.candidate_top1 = float((actual == np.asarray(targets)).mean())
    return report


def has_module(name: str) -> bool:
    """True when `name` can be imported; onnxruntime, onnx and onnxscript are optional speed-ups."""
    try:
        return importlib.util.find_spec(name) is not None
    except ValueError:  # a module set to None in sys.modules: blocked on purpose
        return False


def create_session(onnx_path: Path, threads: int | None = None) -> Any:
    """An ONNX Runtime session tuned for serving: all cores (or `threads`) per request, no busy-waiting.

    Spinning is off because idle ORT threads spinning for work steal the CPU from the web server, from image
    decoding and from PyTorch's Grad-CAM in the same process (measured: PyTorch 1.5x slower beside them).
    """
    try:
        import onnxruntime as ort
    except ImportError as error:
        raise RuntimeUnavailableError(f"the ONNX runtime needs onnxruntime: {ONNX_INSTALL_HINT}.") from error
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3  # errors only: ORT's info lines are noise for users
    available = ort.get_available_providers()
    providers = [name for name in ("CUDAExecutionProvider", "CPUExecutionProvider") if name in available]
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=providers)
    except Exception as error:  # ORT raises its own Fail/InvalidProtobuf/NoSuchFile types
        raise CheckpointError(
            f"'{onnx_path}' is not a usable ONNX model ({str(error).splitlines()[0][:200]}); delete it and "
            "re-export with `python -m finetune.export RUN_DIR --onnx`."
        ) from error


def add_inference_arguments(parser: Any) -> None:
    """--batch-size, --runtime, --tta and --quiet, shared by the predict and evaluate CLIs."""
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto", help="inference runtime")
    parser.add_argument(
        "--tta", nargs="?", const="default", default=None,
        help="test-time augmentation: average over zoomed views ('default' or scales such as 1,0.875,1.15)",
    )  # fmt: skip
    parser.add_argument("--quiet", action="store_true", help="warnings only on stderr")
    parser.add_argument(
        "--reject", action=argparse.BooleanOptionalAction, default=None,
        help="flag images that are none of the classes (default: on when the run has a fitted threshold)",
    )  # fmt: skip
