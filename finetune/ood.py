""" "None of these": an out-of-distribution score from what the model already computes, and its threshold.

A closed-set softmax always picks one of its classes; these scores say how far an image is from everything
the model was trained on (higher = further). Candidates, all from one forward pass:

- `max_softmax`: minus the top probability (Hendrycks & Gimpel, 2017), the classic baseline;
- `max_logit`: minus the top logit (Hendrycks et al., 2022);
- `energy`: minus logsumexp of the logits (Liu et al., 2020);
- `cosine`: 1 - the best cosine similarity of the penultimate features to a class mean of the training
  features (features are what the classifier sees, so a car photo lands far from every digit);
- `mahalanobis`: distance to the nearest class mean under the training features' shared covariance (Lee et
  al., 2018), measured but not stored (a 1280x1280 matrix is too large for config.json).

`bench/trust.py` measures them on digits against photo crops, Fashion-MNIST and noise. After a full lp-ft
run every candidate meets the targets (AUROC >= 0.994; max-logit and max-softmax lead cosine by <= 0.003, one
or two images in 300); after a probe-only run (what the default command does when the time budget allows no
fine-tuning) the logit scores collapse (AUROC 0.62-0.96) while `cosine` stays at 1.0000 with FPR@95 0%. So
training stores `cosine` (`studio.ood` in config.json; DEFAULT_METHOD picks). The threshold is the
validation score that accepts `accept_rate` (0.95 by default) of held-out in-distribution images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_METHOD = "cosine"
DEFAULT_ACCEPT_RATE = 0.95
LOGIT_METHODS = ("max_softmax", "max_logit", "energy")
FEATURE_METHODS = ("cosine", "mahalanobis")
METHODS = LOGIT_METHODS + FEATURE_METHODS


def logsumexp(logits: np.ndarray) -> np.ndarray:
    """log(sum(exp(logits))) per row, numerically stable."""
    top = logits.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(logits - top).sum(axis=1, keepdims=True)))[:, 0]


def logit_scores(logits: np.ndarray) -> dict[str, np.ndarray]:
    """The three logit-based scores of each row of raw (T = 1) logits; higher = further from the classes."""
    logits = np.asarray(logits, np.float64)
    lse = logsumexp(logits)
    top = logits.max(axis=1)
    return {"max_softmax": -np.exp(top - lse), "max_logit": -top, "energy": -lse}


def normalize_rows(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    features = np.asarray(features, np.float64)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def class_means(features: np.ndarray, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """(C, D) unit-length means of each class's unit-length training features (zero for an empty class)."""
    unit = normalize_rows(features)
    means = np.zeros((num_classes, unit.shape[1]))
    np.add.at(means, np.asarray(targets), unit)
    return normalize_rows(means)


def cosine_score(features: np.ndarray, means: np.ndarray) -> np.ndarray:
    """1 - max cosine similarity to a class mean: 0 on a class centre, up to 2 opposite every class."""
    return 1.0 - (normalize_rows(features) @ np.asarray(means, np.float64).T).max(axis=1)


@dataclass
class Mahalanobis:
    """Class means and the whitening of the training features' shared covariance (bench/trust.py only)."""

    means: np.ndarray  # (C, D) in whitened coordinates
    whiten: np.ndarray  # (D, D): x @ whiten has identity covariance, so distances are Euclidean there

    @classmethod
    def fit(cls, features: np.ndarray, targets: np.ndarray, num_classes: int) -> Mahalanobis:
        features = np.asarray(features, np.float64)
        targets = np.asarray(targets)
        means = np.stack([features[targets == c].mean(axis=0) for c in range(num_classes)])
        centred = features - means[targets]
        covariance = centred.T @ centred / max(1, len(features))
        shrink = 1e-3 * np.trace(covariance) / len(covariance)  # few images, many dimensions: regularise
        values, vectors = np.linalg.eigh(covariance + shrink * np.eye(len(covariance)))
        whiten = vectors / np.sqrt(values)
        return cls(means @ whiten, whiten)

    def score(self, features: np.ndarray) -> np.ndarray:
        """Squared distance to the nearest class mean under the shared covariance."""
        white = np.asarray(features, np.float64) @ self.whiten
        cross = white @ self.means.T
        return ((white**2).sum(axis=1, keepdims=True) - 2 * cross + (self.means**2).sum(axis=1)).min(axis=1)


def threshold_for(val_scores: np.ndarray, accept_rate: float) -> float:
    """The score below (or at) which `accept_rate` of the validation images fall: those are accepted."""
    return float(np.quantile(np.asarray(val_scores, np.float64), accept_rate, method="higher"))


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling OOD (positive) from in-distribution images; ties count half."""
    in_scores, out_scores = np.asarray(in_scores, np.float64), np.asarray(out_scores, np.float64)
    combined = np.concatenate([in_scores, out_scores])
    order = combined.argsort(kind="mergesort")
    ranks = np.empty(len(combined))
    sorted_scores = combined[order]
    # average ranks of ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts - 1) / 2.0 + 1
    ranks[order] = np.repeat(average, counts)
    out_rank_sum = ranks[len(in_scores) :].sum()
    n_out, n_in = len(out_scores), len(in_scores)
    return float((out_rank_sum - n_out * (n_out + 1) / 2) / (n_out * n_in))


def fpr_at_tpr(in_scores: np.ndarray, out_scores: np.ndarray, tpr: float = 0.95) -> float:
    """Share of OOD images still accepted when the threshold accepts `tpr` of the in-distribution ones."""
    return float((np.asarray(out_scores) <= threshold_for(in_scores, tpr)).mean())


@dataclass(frozen=True)
class Rejector:
    """The stored OOD method of a run: how to score an image and above which score it is "unknown"."""

    method: str
    threshold: float
    accept_rate: float
    means: np.ndarray | None = None  # (C, D) class means for `cosine`

    @property
    def needs_features(self) -> bool:
        return self.method in FEATURE_METHODS

    def score(self, logits: np.ndarray, features: np.ndarray | None) -> np.ndarray:
        """OOD scores (higher = further) of a batch from its raw logits and penultimate features."""
        if self.method == "cosine":
            if features is None or self.means is None:
                raise ValueError("the cosine OOD score needs the penultimate features")
            return cosine_score(features, self.means)
        return logit_scores(logits)[self.method]

    def to_dict(self) -> dict[str, Any]:
        """The `studio.ood` section of config.json."""
        stored: dict[str, Any] = {
            "method": self.method,
            "threshold": self.threshold,
            "accept_rate": self.accept_rate,
        }
        if self.means is not None:
            stored["class_means"] = np.round(self.means, 6).tolist()
        return stored

    @classmethod
    def from_dict(cls, stored: dict[str, Any]) -> Rejector:
        method = str(stored["method"])
        if method not in METHODS or method == "mahalanobis":
            raise ValueError(f"unknown OOD method {method!r}")
        means = np.asarray(stored["class_means"], np.float64) if method == "cosine" else None
        return cls(method, float(stored["threshold"]), float(stored.get("accept_rate", 0.95)), means)
