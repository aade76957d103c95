"""The one prediction path over files: open a chunk on all cores, collect unreadable ones, predict, yield.

`finetune.predict`, `finetune.evaluate`, the app's Batch tab and the INT8 check all go through here, so they
decode the same way (threads: Pillow releases the GIL while it decodes), report a bad file as a row instead
of failing the whole job, and keep memory at one or two chunks of images however many files there are.
Each file is decoded and resized to the model's view on the pool's threads (`Classifier.view_pixels`), and
the next chunk is prepared while this one is classified, so decoding and the forward pass overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from finetune.errors import ImageError
from finetune.inference import Classifier, Scores, available_cores

Item = TypeVar("Item")
Opened = TypeVar("Opened")


@dataclass
class FileOutcome(Generic[Item]):
    """One input's result: its class probabilities, or why it could not be opened."""

    item: Item
    probs: np.ndarray | None = None
    error: str | None = None
    ood_score: float | None = None  # see `finetune.inference.Scores`: None when the run has no OOD rule
    unknown: bool | None = None
    logits: np.ndarray | None = None  # raw logits, for calibration reports


def open_files(
    items: Sequence[Item], open_item: Callable[[Item], Opened], pool: ThreadPoolExecutor
) -> list[Opened | str]:
    """Open `items` on the pool's threads, in order; an `ImageError` becomes its message, others raise."""

    def attempt(item: Item) -> Opened | str:
        try:
            return open_item(item)
        except ImageError as error:
            return str(error)

    return list(pool.map(attempt, items))


def classify_files(
    classifier: Classifier,
    items: Sequence[Item],
    open_item: Callable[[Item], Image.Image] | None = None,
    chunk_size: int | None = None,
    tta: Sequence[float] | None = None,
    workers: int | None = None,
) -> Iterator[list[FileOutcome[Item]]]:
    """One list of outcomes per chunk of `items`, in input order (callers can write and flush each chunk).

    `open_item` opens one item (default: `classifier.open` on a path); `chunk_size` (default: the classifier's
    batch size) bounds how many decoded images are held at once, twice over while the next chunk opens.
    """
    opener = open_item or classifier.open
    zooms = tuple(tta) if tta else (1.0,)

    def open_and_view(item: Item) -> list[np.ndarray]:  # decode and resize on the pool's threads
        image = opener(item)
        return [classifier.view_pixels(image, zoom) for zoom in zooms]

    size = max(1, chunk_size or classifier.batch_size)
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    if not chunks:
        return
    # `ahead` waits on the decoding pool for the next chunk, so no decoding thread is spent waiting
    with ThreadPoolExecutor(workers or available_cores()) as pool, ThreadPoolExecutor(1) as ahead:
        opening: Future[list[list[np.ndarray] | str]] = ahead.submit(
            open_files, chunks[0], open_and_view, pool
        )
        for number, chunk in enumerate(chunks):
            opened = opening.result()
            if number + 1 < len(chunks):  # decode the next chunk while this one is classified
                opening = ahead.submit(open_files, chunks[number + 1], open_and_view, pool)
            good = [views for views in opened if not isinstance(views, str)]
            scores = classifier.score_views([[views[z] for views in good] for z in range(len(zooms))])
            verdicts = iter(range(len(good)))
            yield [
                FileOutcome(item, error=views)
                if isinstance(views, str)
                else _outcome(item, scores, next(verdicts))
                for item, views in zip(chunk, opened, strict=True)
            ]


def _outcome(item: Item, scores: Scores, row: int) -> FileOutcome[Item]:
    """Row `row` of a chunk's scores as one file's outcome."""
    return FileOutcome(
        item,
        probs=scores.probs[row],
        ood_score=None if scores.ood_scores is None else float(scores.ood_scores[row]),
        unknown=None if scores.unknown is None else bool(scores.unknown[row]),
        logits=None if scores.logits is None else scores.logits[row],
    )
