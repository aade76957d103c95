"""A process-wide budget for decoding images: concurrent large decodes cannot add up.

Every `finetune.images.open_image` call reserves the bytes its decode will allocate before `load()`, so the
app's many request threads, the training cache's worker threads and Batch's chunks share one bound. After
a large decode the freed memory is handed back to the OS, or glibc would keep it per thread.
"""

from __future__ import annotations

import collections
import ctypes
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class DecodeBudget:
    """Bytes of pixels being decoded at once, process-wide: decodes wait in arrival order until theirs fit.

    A decode larger than the whole budget still runs, but alone. Estimates are taken from the header before
    `load()` (width x height x Pillow's bytes per pixel, plus the RGB copy), so a waiting request has not
    yet allocated anything.
    """

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._in_flight = 0
        self._queue: collections.deque[object] = collections.deque()
        self._condition = threading.Condition()

    @property
    def in_flight(self) -> int:
        """Bytes reserved by decodes running now."""
        with self._condition:
            return self._in_flight

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        """Hold `nbytes` of the budget for the duration of the `with` block."""
        ticket = object()
        with self._condition:
            self._queue.append(ticket)
            self._condition.wait_for(
                lambda: (
                    self._queue[0] is ticket
                    and (self._in_flight == 0 or self._in_flight + nbytes <= self.budget_bytes)
                )
            )
            self._queue.popleft()
            self._in_flight += nbytes
            self._condition.notify_all()
        try:
            yield
        finally:
            with self._condition:
                self._in_flight -= nbytes
                self._condition.notify_all()


# 128 MiB: one upload at the 25 MP limit (100 MB as RGB) decodes alone, while drafted phone JPEGs (a few MB
# each) and ordinary PNGs still decode many at once. Measured with bench/upload_memory.py: 8 concurrent
# 24 MP PNG uploads add ~95 MB of peak RSS (283 MB with a 256 MiB budget and no `malloc_trim`).
DECODE_BUDGET = DecodeBudget(128 * 1024**2)
TRIM_AFTER_BYTES = 32 * 1024**2  # decodes this large give their memory back to the OS when done
_malloc_trim: Any = None  # libc's malloc_trim once looked up; False where there is none


def return_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Pillow allocates pixels in 16 MB blocks; once one is freed, glibc stops using mmap for blocks that size
    and keeps later ones in per-thread arenas, so each server thread that once decoded a large image keeps
    its share: measured with bench/upload_memory.py, 8 concurrent 24 MP uploads left +250 MB resident with
    one decode at a time. Trimming after each large decode keeps the peak near the budget.
    """
    global _malloc_trim
    if _malloc_trim is None:
        try:
            _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
        except (OSError, AttributeError):
            _malloc_trim = False
    if _malloc_trim:
        _malloc_trim(0)
