"""InferenceService: the app's models and everything it computes with them, with no Gradio in sight.

The service holds one or more named runs (the embedded ImageNet model, a fine-tuned run folder, an
`hf-hub:` run, runs trained in the app); there is no global selection. Each request names its model (the
visitor's choice, kept in their session; None means the operator's default), looks it up once and uses it
to the end, so replacing a run under the lock never mixes two models in one answer. Who may use which
model is `self.lanes` (`demo.lanes`). Classification goes through
`finetune.runtime.create_classifier` (whatever runtime it picks) behind a `MicroBatcher`, so concurrent
visitors share forward passes; Grad-CAM works on a private copy of the model under its own lock.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from demo.batching import MicroBatcher
from demo.cam import MULTI_SCALES, compute_cams, fuse_cams, model_view, prepare_cam_model, view_scale
from demo.lanes import Lanes
from finetune import multilabel_io
from finetune.checkpoint import LoadedRun, load_default_run, load_run
from finetune.errors import ConfigError, ImageError
from finetune.file_predict import classify_files
from finetune.images import UPLOAD_LIMITS, ImageSource, open_image
from finetune.inference import Classifier, Prediction, Scores, top_k
from finetune.modeling import draft_size_for
from finetune.runtime import create_classifier
from finetune.trust import trust_summary

logger = logging.getLogger(__name__)

DEFAULT_NAME = "tf_efficientnet_lite0 (ImageNet)"
MAX_BATCH_FILES = (
    200  # files per Batch request; more is refused with a message rather than queued for minutes
)
FILE_CHUNK = 16  # files decoded at once in a batch request, which bounds memory for large photos
_RUNTIME_NAMES = {"Classifier": "torch"}  # classifiers that do not name their runtime themselves
MIN_IMAGE_SIDE = 4  # smaller images (1x1 tracking pixels, broken exports) carry nothing to classify


@dataclass(frozen=True)
class ModelInfo:
    """What the model card shows: identity, classes, provenance and validation metrics when known."""

    name: str
    architecture: str
    labels: list[str]
    weights_source: str
    source: str  # run folder (an hf-hub run's cache folder) or "embedded"
    metrics: dict[str, Any] = field(default_factory=dict)
    runtime: str = "torch"
    trust: dict[str, Any] = field(default_factory=dict)  # finetune.trust.trust_summary of the model
    is_multilabel: bool = False  # independent sigmoid probabilities, each against its own threshold


@dataclass
class Explanation:
    """Grad-CAM of one image: the class explained, the model's view of the image and the heatmaps."""

    label: str
    prob: float
    view: Image.Image  # the crop the model saw, rendered for display
    cam: np.ndarray  # single-scale map (H, W) in [0, 1]
    multi_scale_cam: np.ndarray  # maps at `scales`, fused
    scales: tuple[float, ...]
    predicted: Prediction  # top-5 of the image, for the caption


@dataclass(frozen=True)
class BatchRow:
    """One line of the Batch table: a prediction, or the reason the file could not be classified."""

    file: str
    top1: str = ""
    confidence: float | None = None
    top_k: str = ""
    error: str = ""
    ood_score: float | None = None  # higher = further from the model's classes; None: no OOD rule
    unknown: bool | None = None  # True: none of the model's classes; None: rejection off for this model
    labels: str | None = None  # a multi-label model's labels above their thresholds ("; "-joined)


class _Model:
    """A loaded run with its classifier, its request batcher and (on first use) its Grad-CAM copy."""

    def __init__(
        self, name: str, run: LoadedRun, runtime: str, max_batch_size: int, reject: bool | None = None
    ) -> None:
        self.name = name
        self.run = run
        self.runtime = runtime
        self.classifier: Classifier = create_classifier(run, runtime)
        self.classifier.set_reject(reject)
        self.batcher: MicroBatcher[Image.Image, Scores] = MicroBatcher(
            lambda images: self.classifier.score_images(images).rows(),
            max_batch_size=max_batch_size,
            name=f"classify[{name}]",
        )
        self.cam_lock = threading.Lock()
        self._cam_model = None

    def cam_model(self) -> Any:
        """The Grad-CAM copy, made on first use; callers hold `cam_lock`."""
        if self._cam_model is None:
            self._cam_model = prepare_cam_model(self.run.model)
        return self._cam_model


class InferenceService:
    """Named runs, a default one, and the three things the app does with them: classify, explain, batch."""

    def __init__(self, runtime: str = "auto", max_batch_size: int = 8, reject: bool | None = None) -> None:
        self.runtime = runtime
        self.max_batch_size = max_batch_size
        self.reject = reject  # the operator's --reject/--no-reject; None: on for runs with a fitted rule
        self._models: dict[str, _Model] = {}
        self._default: str | None = None  # the operator's model, for requests that name none
        self._lock = threading.Lock()
        self.export_lock = threading.Lock()  # held while a model is exported (torch.export: one at a time)
        self.lanes = Lanes()  # owners of trained runs and each session's model in use

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | Path | None = None,
        runtime: str = "auto",
        max_batch_size: int = 8,
        reject: bool | None = None,
    ) -> InferenceService:
        """Serve `checkpoint` (a run folder or `hf-hub:USER/NAME`), or the embedded ImageNet model."""
        service = cls(runtime=runtime, max_batch_size=max_batch_size, reject=reject)
        if checkpoint:  # a folder is named by its last part: the Model menu must not show server paths
            is_hub = str(checkpoint).startswith("hf-hub:")
            name = str(checkpoint) if is_hub else Path(checkpoint).resolve().name
            service.add_run(name, load_run(checkpoint))
        else:
            service.add_run(DEFAULT_NAME, load_default_run())
        return service

    def add_run(
        self, name: str, run: LoadedRun, make_default: bool = True, runtime: str | None = None
    ) -> None:
        """Serve `run` under `name` (replacing a run of that name); the default model when told (or the
        first one). Trained runs are added with `make_default=False`, owned in `self.lanes`. `runtime`
        overrides the service's for now (see `upgrade_runtime`)."""
        model = _Model(name, run, runtime or self.runtime, self.max_batch_size, self.reject)
        with self._lock:
            old = self._models.pop(name, None)
            self._models[name] = model
            if make_default or self._default is None:
                self._default = name
        if old is not None:
            old.batcher.close()
        logger.info("Serving %s (%s, %d classes).", name, run.architecture, len(run.labels))

    def upgrade_runtime(self, name: str) -> None:
        """Rebuild `name`'s classifier on the service's runtime, swapped in only if the same run is still
        served: a new run answers on PyTorch at once, and `demo.run_serving` calls this once its ONNX export
        exists. Holds `export_lock` (an export in this process must not overlap another)."""
        with self.export_lock:
            with self._lock:
                current = self._models.get(name)
            if current is None or current.runtime == self.runtime:
                return
            model = _Model(name, current.run, self.runtime, self.max_batch_size, self.reject)
            with self._lock:
                is_current = self._models.get(name) is current
                if is_current:
                    self._models[name] = model
            (current if is_current else model).batcher.close()

    def remove_run(self, name: str) -> None:
        """Stop serving `name` (its run folder was pruned); if it was the default, the first model left is."""
        with self._lock:
            model = self._models.pop(name, None)
            if model is not None and self._default == name:
                self._default = next(iter(self._models), None)
        self.lanes.forget(name)
        if model is not None:
            model.batcher.close()
            logger.info("No longer serving %s.", name)

    def set_default(self, name: str) -> None:
        """Make `name` the model of requests that name none (the operator's choice, not a visitor's)."""
        with self._lock:
            if name not in self._models:
                raise ConfigError(f"unknown model '{name}'; choose one of: {', '.join(self._models)}.")
            self._default = name

    def available_models(self) -> list[str]:
        """Names of the runs this service holds, in the order they were added."""
        with self._lock:
            return list(self._models)

    @property
    def default_model(self) -> str:
        """The model of requests that name none: the operator's `--checkpoint` or the embedded one."""
        return self._current().name

    @property
    def labels(self) -> list[str]:
        """The default model's class names (a session's model: `info(model).labels`)."""
        return list(self._current().run.labels)

    def info(self, model: str | None = None) -> ModelInfo:
        """The card of `model` (None: the default)."""
        model = self._current(model)
        run, studio = model.run, model.run.studio
        return ModelInfo(
            name=model.name,
            architecture=run.architecture,
            labels=list(run.labels),
            weights_source=str(studio.get("weights_source", "unknown")),
            source=str(run.run_dir) if run.run_dir is not None else "embedded",
            metrics=dict(studio.get("metrics") or {}),
            runtime=getattr(model.classifier, "runtime", None)
            or _RUNTIME_NAMES.get(type(model.classifier).__name__, type(model.classifier).__name__),
            trust=trust_summary(run.config, model.classifier.trust, model.classifier.reject),
            is_multilabel=model.classifier.is_multilabel,
        )

    def predict_topk(
        self, image: ImageSource, k: int | float = 5, name: str | None = None, model: str | None = None
    ) -> Prediction:
        """Top-k classes of one image by `model` (None: the default); concurrent calls to one model are
        batched into shared forward passes.

        `name` is how the image is called in error messages (an upload's original file name).
        """
        served = self._current(model)
        picture = self._open(served, image, name)
        scores = served.batcher.submit(picture)
        if served.classifier.is_multilabel:  # every label above its threshold, whatever k
            return multilabel_io.present(scores.probs[0], served.run)
        return scores.top_k(served.run.labels, _check_k(k))[0]

    def explain(
        self,
        image: ImageSource,
        target: str | None = None,
        scales: Sequence[float] = MULTI_SCALES,
        name: str | None = None,
        model: str | None = None,
    ) -> Explanation:
        """Grad-CAM of `target` (a class name; None or "" for the predicted one) by `model` (None: the
        default), single and multi-scale."""
        model = self._current(model)
        labels = model.run.labels
        if target and target not in labels:  # checked before the model runs: a wrong name costs nothing
            raise ConfigError(f"unknown class '{target}'; pick one of the model's {len(labels)} classes.")
        picture = self._open(model, image, name, scale=view_scale(model.run.data_config))
        probs = model.classifier.predict_probs([picture])[0]
        index = labels.index(target) if target else int(np.argmax(probs))
        input_tensor = model.run.transform(picture)[None]
        with model.cam_lock:
            cams = compute_cams(model.cam_model(), input_tensor, index, scales)
        return Explanation(
            label=labels[index],
            prob=float(probs[index]),
            view=model_view(picture, model.run.data_config),
            cam=cams[1.0],
            multi_scale_cam=fuse_cams(cams),
            scales=tuple(cams),
            predicted=top_k(probs[None, :], labels, 5)[0],
        )

    def predict_batch(
        self, files: Sequence[str | Path], k: int = 5, model: str | None = None
    ) -> list[BatchRow]:
        """One row per file, in order: its top-k by `model` (None: the default), or why it was unreadable.

        Files with the same bytes (one upload listed many times, or copies) are decoded and classified
        once and share the answer: 16 copies of a 6000x6000 PNG cost one decode, not 16.
        """
        if not files:
            raise ImageError("no files to classify; upload one or more images.")
        if len(files) > MAX_BATCH_FILES:
            raise ConfigError(f"{len(files)} files in one batch; send at most {MAX_BATCH_FILES} at a time.")
        model, k = self._current(model), _check_k(k)
        paths = [Path(file) for file in files]
        keys = [_content_key(path) for path in paths]
        first: dict[str, Path] = {}
        for key, path in zip(keys, paths, strict=True):
            first.setdefault(key, path)
        unique = list(first)
        results: dict[str, Prediction | str] = {}  # a prediction, or the reason the file is unusable
        present: dict[str, list[str]] = {}  # a multi-label model's labels above their thresholds

        def opener(key: str) -> Image.Image:  # upload limits and the run's draft size, decoded on all cores
            return self._open(model, first[key], first[key].name)

        for outcomes in classify_files(model.classifier, unique, opener, chunk_size=FILE_CHUNK):
            for outcome in outcomes:
                if outcome.probs is None:
                    results[outcome.item] = outcome.error or "unreadable"
                else:
                    verdict = (
                        None if outcome.ood_score is None else np.array([outcome.ood_score]),
                        None if outcome.unknown is None else np.array([outcome.unknown]),
                    )
                    results[outcome.item] = top_k(outcome.probs[None], model.run.labels, k, *verdict)[0]
                    if model.classifier.is_multilabel:
                        present[outcome.item] = multilabel_io.present(outcome.probs, model.run).labels
        rows = []
        for key, path in zip(keys, paths, strict=True):
            result = results[key]
            if isinstance(result, str):
                rows.append(BatchRow(file=path.name, error=result.replace(first[key].name, path.name)))
                continue
            rows.append(
                BatchRow(
                    file=path.name,
                    top1=result.label,
                    confidence=round(result.prob, 4),
                    top_k=", ".join(f"{label} ({prob:.1%})" for label, prob in result.as_dict().items()),
                    ood_score=None if result.ood_score is None else round(result.ood_score, 4),
                    unknown=result.unknown,
                    labels="; ".join(present[key]) if key in present else None,
                )
            )
        return rows

    def close(self) -> None:
        """Stop the batch workers (tests and app shutdown)."""
        with self._lock:
            models = list(self._models.values())
        for model in models:
            model.batcher.close()

    def batch_sizes(self, model: str | None = None) -> dict[int, int]:
        """How many forward passes of each size the batcher of `model` (None: the default) has run."""
        return dict(self._current(model).batcher.batch_sizes)

    def _current(self, name: str | None = None) -> _Model:
        """The served model `name` (None: the default); callers checked the visitor may use it."""
        with self._lock:
            if self._default is None:
                raise ConfigError("no model loaded; start the app with --checkpoint RUN_DIR or the default.")
            model = self._models.get(name or self._default)
        if model is None:
            raise ConfigError(f"no model '{str(name)[:80]}' here; pick one from the Model menu.")
        return model

    def _open(self, model: _Model, image: ImageSource, name: str | None, scale: float = 1.0) -> Image.Image:
        """Open through `open_image`, decoding JPEGs only as large as the run's resize step needs."""
        try:
            picture = open_image(image, draft_size_for(model.run.data_config, scale), limits=UPLOAD_LIMITS)
        except ImageError as error:
            if name and isinstance(image, (str, Path)):  # uploads live under random cache paths
                raise ImageError(str(error).replace(str(image), name)) from error
            raise
        if min(picture.size) < MIN_IMAGE_SIDE:
            described = f"'{name}'" if name else "the image"
            raise ImageError(
                f"{described} is only {picture.width}x{picture.height} pixels, too small to classify; "
                f"use an image at least {MIN_IMAGE_SIDE} pixels on each side."
            )
        return picture


def _content_key(path: Path) -> str:
    """SHA-256 of a file's bytes, so duplicates in one batch are decoded once; its path when unreadable
    (opening it then gives the proper message)."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    except OSError:
        return f"unreadable:{path}"
    return digest.hexdigest()


def _check_k(k: Any) -> int:
    try:
        value = int(k)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"k must be a whole number of classes, got {k!r}.") from error
    if value < 1:
        raise ConfigError(f"k must be at least 1, got {value}.")
    return value
