"""Out-of-fold class probabilities for the label check: what a linear probe that never saw an image, and
that image's neighbours, say its class is (finetune/data_health.py ranks the disagreements with cleanlab).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from finetune.neighbours import Neighbours, principal_directions, unit_rows
from finetune.probe import fit_softmax_regression

FOLDS = 5  # k of the out-of-fold probe
OOF_STEPS = 100  # L-BFGS iterations per fold
OOF_DIMS = 256  # principal components the k-fold probe sees: 5x cheaper than 1,280 features
ONE_THREAD_UP_TO = 10_000  # images; the k-fold probe of larger sets uses every thread
OOF_L2 = 1e-2  # L2 penalty on the probe's weights: keeps out-of-fold probabilities from overconfidence
KNN_TEMPERATURE = 0.02  # softmax temperature of the neighbours' similarities in the vote


def out_of_fold_probabilities(
    features: torch.Tensor, targets: np.ndarray, num_classes: int, folds: int = FOLDS, seed: int = 0
) -> np.ndarray:
    """(N, C) probabilities of each image from a linear probe that never saw it (stratified k-fold)."""
    rng = np.random.default_rng(seed)
    fold_of = np.zeros(len(targets), dtype=np.int64)
    for target in np.unique(targets):
        members = np.flatnonzero(targets == target)
        fold_of[rng.permutation(members)] = np.arange(len(members)) % folds
    # small matrices: a second thread only adds synchronisation (10x slower when busy); large ones split well
    # (70,000 x 1,280 synthetic features: 22.9 s on one thread, 11.4 s on two)
    threads = contextlib.nullcontext() if len(targets) > ONE_THREAD_UP_TO else _one_thread()
    with threads:
        return _out_of_fold(features, targets, num_classes, fold_of)


def _out_of_fold(
    features: torch.Tensor, targets: np.ndarray, num_classes: int, fold_of: np.ndarray
) -> np.ndarray:
    folds = int(fold_of.max()) + 1
    # unit vectors (the geometry the neighbours see), scaled so a modest weight reaches confident logits;
    # principal components keep the big directions without amplifying the small, noisy ones
    standard = _principal_components(unit_rows(features), OOF_DIMS) * 30  # the small projection is scaled
    probabilities = np.full((len(targets), num_classes), 1.0 / num_classes)
    labels = torch.as_tensor(targets, dtype=torch.long)
    for fold in range(folds):
        held, fit = np.flatnonzero(fold_of == fold), np.flatnonzero(fold_of != fold)
        if not len(held) or not len(fit):
            continue
        weight, bias = fit_softmax_regression(standard[fit], labels[fit], num_classes, OOF_L2, OOF_STEPS)
        with torch.no_grad():
            logits = standard[held] @ weight + bias
            probabilities[held] = torch.softmax(logits, dim=1).double().numpy()
    return probabilities


def knn_probabilities(neighbours: Neighbours, targets: np.ndarray, num_classes: int) -> np.ndarray:
    """Class probabilities from each image's neighbours (never itself), weighted by softmax(sim / 0.02)."""
    weights = torch.softmax(neighbours.similarity.double() / KNN_TEMPERATURE, dim=1)
    labels = torch.as_tensor(targets, dtype=torch.long)[neighbours.index]
    votes = torch.zeros(len(targets), num_classes, dtype=torch.float64).scatter_add_(1, labels, weights)
    votes += 1e-3  # no class is impossible
    return (votes / votes.sum(dim=1, keepdim=True)).numpy()


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _principal_components(features: torch.Tensor, dims: int) -> torch.Tensor:
    """The features projected on their top `dims` principal directions (all of them when fewer)."""
    if features.shape[1] <= dims or len(features) <= dims:
        return features
    mean, basis = principal_directions(features, dims)
    return features @ basis - mean @ basis
