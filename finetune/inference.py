"""Batched inference on a loaded run: preprocessing, probabilities and top-k, defined once.

`finetune.predict`, `finetune.evaluate` and the app's service all classify through `Classifier`, so they agree
on preprocessing, label order and how top-k is reported.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from finetune.checkpoint import LoadedRun


@dataclass
class Prediction:
    """Top-k of one image: labels and probabilities, best first."""

    labels: list[str]
    probs: list[float]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def prob(self) -> float:
        return self.probs[0]

    def as_dict(self) -> dict[str, float]:
        """`{label: prob}`, the shape `gr.Label` expects."""
        return dict(zip(self.labels, self.probs, strict=True))


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[Prediction]:
    """Top-k predictions for each row of an (N, C) probability array."""
    k = max(1, min(int(k), probs.shape[1]))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [
        Prediction(labels=[labels[i] for i in row], probs=[float(p) for p in probs[n, row]])
        for n, row in enumerate(order)
    ]


class Classifier:
    """Runs a `LoadedRun` in PyTorch; thread-safe, because one instance serves all of the app's requests."""

    def __init__(self, run: LoadedRun, batch_size: int = 32) -> None:
        self.run = run
        self.labels = run.labels
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def draft_size(self) -> tuple[int, int]:
        """Smallest decode size that loses nothing before the eval resize (for JPEG draft decoding)."""
        size = int(self.run.data_config["input_size"][-1])
        return (size, size)

    def preprocess(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """The run's own eval transform, stacked into one batch."""
        return torch.stack([self.run.transform(image) for image in images])

    def predict_logits(self, batch: torch.Tensor) -> np.ndarray:
        """Logits of an already preprocessed batch, in chunks of `batch_size`."""
        outputs = []
        with self._lock, torch.inference_mode():
            for start in range(0, len(batch), self.batch_size):
                outputs.append(self.run.model(batch[start : start + self.batch_size]).float())
        return torch.cat(outputs).numpy() if outputs else np.zeros((0, len(self.labels)), np.float32)

    def predict_probs(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Softmax probabilities, one row per image."""
        if not images:
            return np.zeros((0, len(self.labels)), np.float32)
        return softmax(self.predict_logits(self.preprocess(images)))

    def predict(self, images: Sequence[Image.Image], k: int = 5) -> list[Prediction]:
        """Top-k labels for each image."""
        return top_k(self.predict_probs(images), self.labels, k)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


RUNTIMES = ("auto", "onnx", "torch")


def create_classifier(run: LoadedRun, runtime: str = "auto", batch_size: int = 32) -> Classifier:
    """The classifier for `run` on the requested runtime; every inference caller goes through here.

    "auto" picks the fastest runtime available for the run; "torch" forces PyTorch.
    """
    from finetune.errors import ConfigError

    if runtime not in RUNTIMES:
        raise ConfigError(f"invalid runtime '{runtime}'; choose one of {', '.join(RUNTIMES)}.")
    return Classifier(run, batch_size=batch_size)
