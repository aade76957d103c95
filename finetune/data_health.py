"""Data health checks: duplicates, leakage, likely mislabels, outliers, odd sizes and class imbalance.

Every check runs on what a training already has: the SHA-256 of each file (split.json), the header size of
each image and the frozen-backbone features the linear probe extracts. Nothing here reads pixels, moves or
deletes a file; the result is a list of `Finding`s, each naming its files, a score and, where one makes
sense, the class the data suggests and the files a user would leave out (`--exclude-issues`).

- exact duplicates: the same bytes twice (content hash);
- near duplicates: feature cosine similarity >= `NEAR_DUPLICATE_SIMILARITY` (resized, re-encoded copies);
  a pair is *leakage* when it spans train and val/test (the validation score is inflated by it), a
  *conflict* when its two files carry different classes, else *within_class*;
- label issues: out-of-fold probabilities of a k-fold linear probe on the features, ranked by cleanlab's
  `find_label_issues` (confident learning), the standard implementation;
- outliers: images whose features are far from every class's centroid (robust z-score of that distance);
- tiny or extreme-aspect images, from the files' header sizes; class imbalance from the class counts.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from finetune.neighbours import Neighbours, nearest_neighbours, unit_rows
from finetune.out_of_fold import FOLDS, knn_probabilities, out_of_fold_probabilities

logger = logging.getLogger(__name__)

CHECKS = (
    "exact_duplicate",
    "near_duplicate",
    "label_issue",
    "outlier",
    "tiny_image",
    "extreme_aspect",
    "class_imbalance",
)
KINDS = ("leakage", "conflict", "within_class")  # what a duplicate pair or group is
NEAR_DUPLICATE_SIMILARITY = 0.97  # feature cosine similarity that alone makes a near duplicate
CANDIDATE_SIMILARITY = 0.85  # ...that makes a candidate for the pixel check (JPEG-re-encoded digits: 0.91)
PIXEL_MATCH = 0.99  # correlation of the 24x24 grey pixels that confirms a candidate
SIGNATURE_PX = 24
OUTLIER_Z = 6.0  # robust z-score (median / MAD) of the distance to the nearest class centroid
TINY_SIDE_PX = 16  # an image whose short side is below this...
TINY_SHARE_OF_MEDIAN = 0.25  # ...or below this share of the dataset's median short side is "tiny"
EXTREME_ASPECT = 4.0  # long side / short side
IMBALANCE_RATIO = 3.0  # largest / smallest class count that deserves a finding (trainer balances from 3x)


@dataclass(frozen=True)
class FileRef:
    """One image: path relative to the dataset folder (POSIX), its class and subset."""

    path: str
    label: str
    subset: str  # "train" | "val" | "test"


@dataclass
class Finding:
    """One problem: its check, the files involved, a score (higher = more certain or more severe)."""

    check: str  # one of CHECKS
    files: list[FileRef]
    score: float
    kind: str | None = None  # duplicates: one of KINDS
    suggested_class: str | None = None  # label issues, conflicts: the class the features point to
    detail: str = ""  # one line for people
    exclude: list[str] = field(default_factory=list)  # paths `--exclude-issues` leaves out of training

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "files": [asdict(f) for f in self.files]}


@dataclass
class HealthInput:
    """What the checks read, one row per image; `features` rows follow `files`."""

    files: list[FileRef]
    classes: list[str]
    features: torch.Tensor | None = None  # (M, D) pooled backbone features of files[:M] (M <= N), or None
    digests: list[str] | None = None  # SHA-256 of each file ('' when unreadable)
    sizes: list[tuple[int, int] | None] | None = None  # (width, height) from the header
    signatures: torch.Tensor | None = None  # `pixel_signatures` rows, like `features`
    seed: int = 0


@dataclass
class HealthReport:
    """All findings, with counts per check and the out-of-fold probabilities (for suggested classes)."""

    findings: list[Finding]
    class_counts: dict[str, dict[str, int]]  # subset -> class -> count
    num_files: int
    timings_s: dict[str, float] = field(default_factory=dict)

    def counts(self) -> dict[str, int]:
        """Findings per check (every check present, 0 when clean)."""
        counts = dict.fromkeys(CHECKS, 0)
        for finding in self.findings:
            counts[finding.check] += 1
        return counts

    def excluded_paths(self) -> list[str]:
        """Every path some finding suggests leaving out, each once, in finding order."""
        return list(dict.fromkeys(path for finding in self.findings for path in finding.exclude))


def check_data(data: HealthInput) -> HealthReport:
    """Run every check the input allows (features enable near duplicates, label issues and outliers)."""
    timings: dict[str, float] = {}

    def timed(name: str, step: Callable[[], Any]) -> Any:
        started = time.perf_counter()
        result = step()
        timings[name] = round(time.perf_counter() - started, 3)
        return result

    findings: list[Finding] = []
    if data.digests is not None:
        findings += timed("exact_duplicate", lambda: exact_duplicates(data.files, data.digests))
    featured = data.files[: len(data.features)] if data.features is not None else []
    if len(featured) > 2:  # the first len(features) files have features (a test/ folder may not)
        near = timed("neighbours", lambda: nearest_neighbours(data.features))
        findings += timed(
            "near_duplicate", lambda: near_duplicates(featured, near, data.digests, data.signatures)
        )
        findings += timed(
            "label_issue", lambda: label_issues(featured, data.classes, data.features, near, data.seed)
        )
        findings += timed("outlier", lambda: outliers(featured, data.classes, data.features))
    if data.sizes is not None:
        findings += timed("size", lambda: odd_sizes(data.files, data.sizes))
    findings += timed("class_imbalance", lambda: class_imbalance(data.files, data.classes))
    counts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(data.classes, 0))
    for ref in data.files:
        counts[ref.subset][ref.label] += 1
    return HealthReport(findings, dict(counts), len(data.files), timings)


def exact_duplicates(files: list[FileRef], digests: list[str] | None) -> list[Finding]:
    """Groups of files with the same bytes; the first train copy is kept, the others are to exclude."""
    groups: dict[str, list[int]] = defaultdict(list)
    for index, digest in enumerate(digests or []):
        if digest:
            groups[digest].append(index)
    findings = []
    for members in groups.values():
        if len(members) < 2:
            continue
        refs = [files[i] for i in members]
        kind = _kind(refs)
        findings.append(
            Finding(
                "exact_duplicate",
                refs,
                1.0,
                kind,
                None,
                f"{len(refs)} files with identical bytes ({_kind_text(kind)})",
                _to_exclude(refs, kind),
            )  # fmt: skip
        )
    return findings


def near_duplicates(
    files: list[FileRef],
    neighbours: Neighbours,
    digests: list[str] | None = None,
    signatures: torch.Tensor | None = None,
) -> list[Finding]:
    """Pairs that are the same picture resized or re-encoded, but not byte-identical.

    Features find candidates (each image's nearest neighbours with cosine >= `CANDIDATE_SIMILARITY`);
    the decoded pixels confirm them (`pixel_signatures` correlation >= `PIXEL_MATCH`). Features alone
    cannot tell a JPEG re-encode of a digit (0.91 here) from two different 3s (up to 0.92), and pixels
    alone would compare every pair. Without signatures, features alone decide (>= 0.97).
    """
    floor = CANDIDATE_SIMILARITY if signatures is not None else NEAR_DUPLICATE_SIMILARITY
    findings, seen = [], set()
    for i, position in (neighbours.similarity >= floor).nonzero().tolist():
        j = int(neighbours.index[i, position])
        pair = (min(i, j), max(i, j))
        if pair in seen or (digests and digests[i] and digests[i] == digests[j]):
            continue  # each pair once; exact copies are reported by their hash
        seen.add(pair)
        similarity = float(neighbours.similarity[i, position])
        detail = f"feature similarity {similarity:.3f}"
        if signatures is not None:
            match = float(signatures[i] @ signatures[j])
            if match < PIXEL_MATCH:
                continue
            detail += f", pixel correlation {match:.4f}"
        refs = [files[pair[0]], files[pair[1]]]
        kind = _kind(refs)
        findings.append(
            Finding(
                "near_duplicate",
                refs,
                round(similarity, 4),
                kind,
                None,
                f"{detail} ({_kind_text(kind)})",
                _to_exclude(refs, kind),
            )  # fmt: skip
        )
    findings.sort(key=lambda f: -f.score)
    return findings


def pixel_signatures(pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 24*24) zero-mean unit vectors of the grey image, for `near_duplicates`.

    Copies of one picture land on nearly the same pixels after the run's resize and crop (correlation
    >= 0.9999 for resized and JPEG-re-encoded digits here; different digits reach 0.973).
    """
    grey = pixels.float().mean(dim=1, keepdim=True)
    small = torch.nn.functional.adaptive_avg_pool2d(grey, SIGNATURE_PX).flatten(1)
    return torch.nn.functional.normalize(small - small.mean(dim=1, keepdim=True), dim=1)


def label_issues(
    files: list[FileRef],
    classes: list[str],
    features: torch.Tensor,
    neighbours: Neighbours | None = None,
    seed: int = 0,
) -> list[Finding]:
    """Files whose class disagrees with out-of-fold probabilities, ranked by cleanlab.

    The probabilities average a k-fold linear probe and a leave-one-out k-NN vote on the same features:
    the two err on different images, and on the planted digits the average finds as many flipped labels
    as either alone at clearly higher precision (bench/data_health.py).
    """
    from cleanlab.filter import find_label_issues

    index = {name: i for i, name in enumerate(classes)}
    targets = np.array([index[ref.label] for ref in files], dtype=np.int64)
    present = np.unique(targets)
    if len(present) < 2 or np.bincount(targets).max() < 2:
        return []
    folds = int(min(FOLDS, max(2, np.bincount(targets)[present].min())))
    probabilities = out_of_fold_probabilities(features, targets, len(classes), folds, seed)
    if neighbours is not None:
        probabilities = (probabilities + knn_probabilities(neighbours, targets, len(classes))) / 2
    # cleanlab needs every class of pred_probs to have an example: restrict to the classes present
    given = np.searchsorted(present, targets)
    sub = probabilities[:, present]
    sub = sub / sub.sum(axis=1, keepdims=True)
    ranked = find_label_issues(given, sub, return_indices_ranked_by="self_confidence", n_jobs=1)
    findings = []
    for i in ranked.tolist():
        suggested = classes[int(present[sub[i].argmax()])]
        confidence = float(sub[i, given[i]])
        findings.append(
            Finding(
                "label_issue",
                [files[i]],
                round(1.0 - confidence, 4),
                None,
                suggested,
                f"filed as {files[i].label}, looks like {suggested} (p={sub[i].max():.2f}; "
                f"p of its own class {confidence:.2f})",
                [files[i].path],
            )  # fmt: skip
        )
    return findings


def outliers(
    files: list[FileRef], classes: list[str], features: torch.Tensor, z_threshold: float = OUTLIER_Z
) -> list[Finding]:
    """Images far from every class: cosine distance to the nearest class centroid, as a robust z-score.

    A mislabelled image sits near another class's centroid (a label issue, not an outlier); a screenshot or
    a blank frame among photos is far from all of them.
    """
    unit = unit_rows(features)
    index = {name: i for i, name in enumerate(classes)}
    targets = torch.tensor([index[ref.label] for ref in files])
    present = targets.unique()
    centroids = torch.stack([unit[targets == c].mean(dim=0) for c in present])
    centroids = torch.nn.functional.normalize(centroids, dim=1)
    similarity = unit @ centroids.T
    nearest = similarity.max(dim=1)
    distance = (1.0 - nearest.values).numpy()
    median = float(np.median(distance))
    spread = 1.4826 * float(np.median(np.abs(distance - median))) or 1e-6
    z = (distance - median) / spread
    findings = []
    for i in np.flatnonzero(z >= z_threshold):
        suggested = classes[int(present[nearest.indices[i]])]
        findings.append(
            Finding(
                "outlier",
                [files[i]],
                round(float(z[i]), 2),
                None,
                suggested,
                f"far from every class (distance {distance[i]:.3f} to the nearest, {suggested}; typical "
                f"{median:.3f})",
                [files[i].path],
            )  # fmt: skip
        )
    findings.sort(key=lambda f: -f.score)
    return findings


def odd_sizes(files: list[FileRef], sizes: list[tuple[int, int] | None]) -> list[Finding]:
    """Tiny images (short side under 16 px or under a quarter of the typical one) and extreme aspects."""
    shorts = [min(size) for size in sizes if size]
    if not shorts:
        return []
    tiny_below = max(TINY_SIDE_PX, TINY_SHARE_OF_MEDIAN * float(np.median(shorts)))
    findings = []
    for ref, size in zip(files, sizes, strict=True):
        if not size:
            continue
        short, long = min(size), max(size)
        if short < tiny_below:
            findings.append(
                Finding("tiny_image", [ref], round(tiny_below / max(short, 1), 2),
                        detail=f"{size[0]}x{size[1]} px (typical short side {np.median(shorts):.0f} px)")
            )  # fmt: skip
        if long / max(short, 1) >= EXTREME_ASPECT:
            findings.append(
                Finding("extreme_aspect", [ref], round(long / max(short, 1), 2),
                        detail=f"{size[0]}x{size[1]} px: the centre crop keeps {short / long:.0%} of it")
            )  # fmt: skip
    findings.sort(key=lambda f: (f.check, -f.score))
    return findings


def class_imbalance(files: list[FileRef], classes: list[str]) -> list[Finding]:
    """One finding when the training classes differ `IMBALANCE_RATIO`x or more in size."""
    counts = dict.fromkeys(classes, 0)
    for ref in files:
        if ref.subset == "train":
            counts[ref.label] += 1
    present = {name: n for name, n in counts.items() if n}
    if len(present) < 2:
        return []
    largest, smallest = max(present, key=present.get), min(present, key=present.get)
    ratio = present[largest] / present[smallest]
    if ratio < IMBALANCE_RATIO:
        return []
    small = sorted((n, name) for name, n in present.items() if n * IMBALANCE_RATIO <= present[largest])
    return [
        Finding(
            "class_imbalance",
            [],
            round(ratio, 2),
            detail=f"{largest} has {present[largest]} training images, {smallest} {present[smallest]} "
            f"({ratio:.1f}x); small classes: " + ", ".join(f"{name} ({n})" for n, name in small[:10]),
        )  # fmt: skip
    ]


def _kind(refs: list[FileRef]) -> str:
    if len({ref.subset for ref in refs}) > 1:
        return "leakage"
    if len({ref.label for ref in refs}) > 1:
        return "conflict"
    return "within_class"


def _kind_text(kind: str) -> str:
    return {
        "leakage": "in training and in val/test: the validation score counts them as unseen",
        "conflict": "filed under different classes",
        "within_class": "same class",
    }[kind]


def _to_exclude(refs: list[FileRef], kind: str) -> list[str]:
    """Which copies training should leave out: a conflict's every copy (which class is right is unknown),
    leakage's training copies (validation stays as the user split it), a class's extra copies."""
    if kind == "conflict":
        return [ref.path for ref in refs]
    if kind == "leakage":
        return [ref.path for ref in refs if ref.subset == "train"]
    return [ref.path for ref in refs[1:]]
