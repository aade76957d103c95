"""Dynamic batching: requests that arrive while the model is busy are answered together in one forward pass.

Gradio's own `batch=True` fails every request of a batch when one of them raises, so one visitor's corrupt
upload would become everyone's error. Here each request decodes and validates its own image in its own
thread (errors stay with their request) and only the model call is shared: a single worker thread takes
the first waiting item, collects whatever else is already waiting (up to `max_batch_size`, waiting at most
`max_wait_s` for company) and runs them as one batch. The worker is also the only thread that touches the
model through this batcher, which keeps inference thread-safe.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

logger = logging.getLogger(__name__)

Item = TypeVar("Item")
Result = TypeVar("Result")


class MicroBatcher(Generic[Item, Result]):
    """Calls `predict(items) -> results` on batches formed from concurrent `submit()` calls."""

    def __init__(
        self,
        predict: Callable[[list[Item]], Sequence[Result]],
        max_batch_size: int = 8,
        max_wait_s: float = 0.002,
        name: str = "batcher",
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self.predict = predict
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.name = name
        self.batch_sizes: Counter[int] = Counter()  # how many batches of each size ran (for tests, metrics)
        self._queue: queue.Queue[tuple[Item, Future[Result]] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._state_lock = threading.Lock()
        self._closed = False

    def submit(self, item: Item, timeout_s: float | None = None) -> Result:
        """Queue `item`, block until its batch has run and return its own result (or raise its error).

        After `close()` (the model was swapped out while a request was on its way) the item is answered
        alone in the caller's thread, so a late request still gets its answer.
        """
        future: Future[Result] = Future()
        with self._state_lock:  # nothing is queued behind the stop marker, so no request waits forever
            is_open = not self._closed
            if is_open:
                self._ensure_worker()
                self._queue.put((item, future))
        if not is_open:
            return self.predict([item])[0]
        return future.result(timeout=timeout_s)

    def close(self) -> None:
        """Finish the items already queued and stop the worker."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
            worker = self._worker
            if worker is not None:
                self._queue.put(None)
        if worker is not None:
            worker.join(timeout=10)

    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._worker.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = self._collect(batch)
            self._run_batch(batch)
            if stop:
                return

    def _collect(self, batch: list[tuple[Item, Future[Result]]]) -> bool:
        """Add waiting items to `batch`; True when the stop marker was met (finish this batch, then stop)."""
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch_size:
            remaining_s = deadline - time.monotonic()
            try:
                entry = self._queue.get(timeout=remaining_s) if remaining_s > 0 else self._queue.get_nowait()
            except queue.Empty:
                return False
            if entry is None:
                return True
            batch.append(entry)
        return False

    def _run_batch(self, batch: list[tuple[Item, Future[Result]]]) -> None:
        items = [item for item, _ in batch]
        self.batch_sizes[len(items)] += 1
        try:
            results = self.predict(items)
            if len(results) != len(items):
                raise RuntimeError(f"{self.name}: {len(results)} results for {len(items)} items")
        except BaseException as error:  # a failed batch fails each of its requests, never the worker
            logger.exception("%s: a batch of %d failed", self.name, len(items))
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), result in zip(batch, results, strict=True):
            future.set_result(result)
