"""The one prediction path over files: open a chunk on all cores, collect unreadable ones, predict, yield.

`finetune.predict`, `finetune.evaluate`, the app's Batch tab and the INT8 check all go through here, so they
decode the same way (threads: Pillow releases the GIL while it decodes), report a bad file as a row instead
of failing the whole job, and keep memory at one or two chunks of images however many files there are.
The next chunk is opened while the current one is classified, so decoding and the forward pass overlap.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np
from PIL import Image

from finetune.errors import ImageError
from finetune.inference import Classifier, available_cores

Item = TypeVar("Item")


@dataclass
class FileOutcome(Generic[Item]):
    """One input's result: its class probabilities, or why it could not be opened."""

    item: Item
    probs: np.ndarray | None = None
    error: str | None = None


def open_files(
    items: Sequence[Item], open_item: Callable[[Item], Image.Image], pool: ThreadPoolExecutor
) -> list[Image.Image | str]:
    """Open `items` on the pool's threads, in order; an `ImageError` becomes its message, others raise."""

    def attempt(item: Item) -> Image.Image | str:
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
    size = max(1, chunk_size or classifier.batch_size)
    chunks = [items[start : start + size] for start in range(0, len(items), size)]
    if not chunks:
        return
    # `ahead` waits on the decoding pool for the next chunk, so no decoding thread is spent waiting
    with ThreadPoolExecutor(workers or available_cores()) as pool, ThreadPoolExecutor(1) as ahead:
        opening: Future[list[Image.Image | str]] = ahead.submit(open_files, chunks[0], opener, pool)
        for number, chunk in enumerate(chunks):
            opened = opening.result()
            if number + 1 < len(chunks):  # decode the next chunk while this one is classified
                opening = ahead.submit(open_files, chunks[number + 1], opener, pool)
            images = [image for image in opened if isinstance(image, Image.Image)]
            probs = iter(classifier.predict_probs(images, tta=tta))
            yield [
                FileOutcome(item, probs=next(probs))
                if isinstance(image, Image.Image)
                else FileOutcome(item, error=image)
                for item, image in zip(chunk, opened, strict=True)
            ]
