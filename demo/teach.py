"""Teach sessions: the classes a visitor fills from the webcam or uploads, kept per session on bounded disk.

Teachable Machine's flow (add a class, hold an object up to the camera, capture a burst of frames, train)
needs images on the server before training, but they belong to one visitor and one page: a `TeachSession`
holds one session's classes, each a list of small JPEGs under `ROOT/<hash of the session>/`, and the
`TeachStore` holds the sessions. Nothing here is shared between sessions, and disk use is bounded three ways:
frames are shrunk to `FRAME_SIDE` before they are written, each session has class and image caps, and the
store keeps at most `max_sessions` sessions and `max_bytes` in all, dropping the least recently used first
(API clients never close a page, so idle sessions also expire after `ttl_s`). The page's unload drops its
session at once.

A burst from the webcam is a *capture window*: `start_capture(name, seconds)` opens it, and `capture()` keeps
a streamed frame only while it is open and at most one per `min_interval_s`, so N seconds give a steady,
predictable number of frames whatever rate the browser sends. Training reads `as_classes()`, the
(name, files) pairs `demo.uploads.import_class_files` imports like any class upload. No Gradio here.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from finetune.class_names import check_class_names, shown_name
from finetune.errors import ConfigError, DatasetError

FRAME_SIDE = 256  # frames are stored at most this large (the embedded model crops 224 px from it)
JPEG_QUALITY = 88
MAX_CLASSES = 8
MAX_IMAGES_PER_CLASS = 120  # a few dozen are enough; the cap bounds one session's disk (~1.5 MB a class)
MAX_CAPTURE_S = 10.0  # the longest burst one button press records
CAPTURE_FPS = 5.0  # frames kept per second of a burst
SESSION_TTL_S = 3600.0  # a session untouched this long is dropped (API clients never unload)
MAX_SESSIONS = 64
MAX_STORE_BYTES = 512 * 1024**2


@dataclass
class _Capture:
    """An open capture window: frames go to `name` until `until`, one per `min_interval_s`."""

    name: str
    until: float
    min_interval_s: float
    last: float = 0.0


@dataclass
class TeachSession:
    """One visitor's classes and images (files under `folder`), in the order they were added."""

    folder: Path
    classes: dict[str, list[Path]] = field(default_factory=dict)
    touched: float = field(default_factory=time.monotonic)
    capture_window: _Capture | None = None
    _counter: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add_class(self, name: str) -> str:
        """Add an empty class; the name passes `finetune.class_names` and differs from the others."""
        name = (name or "").strip()
        with self._lock:
            if len(self.classes) >= MAX_CLASSES:
                raise DatasetError(f"{MAX_CLASSES} classes at most here; delete one before adding another.")
            check_class_names([*self.classes, name])
            self.classes[name] = []
        return name

    def remove_class(self, name: str) -> None:
        """Delete a class and its images."""
        with self._lock:
            paths = self.classes.pop(self._known(name))
            if self.capture_window is not None and self.capture_window.name == name:
                self.capture_window = None
        for path in paths:
            path.unlink(missing_ok=True)

    def add_image(self, name: str, image: Image.Image) -> Path:
        """Store `image` (shrunk to `FRAME_SIDE`, RGB JPEG) in class `name`."""
        with self._lock:
            images = self.classes[self._known(name)]
            if len(images) >= MAX_IMAGES_PER_CLASS:
                raise DatasetError(
                    f"class {shown_name(name)} already has {MAX_IMAGES_PER_CLASS} images, the most one class "
                    "takes here; delete some first."
                )
            self._counter += 1
            path = self.folder / f"{self._counter:06d}.jpg"
            images.append(path)
        frame = image.convert("RGB")
        frame.thumbnail((FRAME_SIDE, FRAME_SIDE), Image.BILINEAR)
        self.folder.mkdir(parents=True, exist_ok=True)
        frame.save(path, "JPEG", quality=JPEG_QUALITY)
        return path

    def delete_image(self, name: str, index: int) -> None:
        """Delete the `index`-th image (0 = first) of class `name`."""
        with self._lock:
            images = self.classes[self._known(name)]
            if not 0 <= index < len(images):
                raise ConfigError(f"class {shown_name(name)} has no image number {index + 1}.")
            path = images.pop(index)
        path.unlink(missing_ok=True)

    def start_capture(self, name: str, seconds: float, fps: float = CAPTURE_FPS) -> None:
        """Open a capture window: the next `seconds` of streamed frames go to `name`, `fps` a second."""
        with self._lock:
            self._known(name)
            now = time.monotonic()
            self.capture_window = _Capture(name, now + seconds, 1.0 / fps)

    def capture(self, image: Image.Image, now: float | None = None) -> bool:
        """Keep a streamed frame when a capture window is open and the steady rate allows; True if kept.

        A full class closes the window instead of raising: a burst simply stops at the cap.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            window = self.capture_window
            if window is None or now >= window.until or window.name not in self.classes:
                self.capture_window = None
                return False
            if window.last and now - window.last < window.min_interval_s * 0.9:  # jitter of the sender
                return False
            if len(self.classes[window.name]) >= MAX_IMAGES_PER_CLASS:
                self.capture_window = None
                return False
            window.last = now
        self.add_image(window.name, image)
        return True

    @property
    def is_capturing(self) -> bool:
        window = self.capture_window
        return window is not None and time.monotonic() < window.until

    def counts(self) -> dict[str, int]:
        """Images per class, in order."""
        with self._lock:
            return {name: len(paths) for name, paths in self.classes.items()}

    def images(self, name: str) -> list[Path]:
        """The files of class `name`, oldest first."""
        with self._lock:
            return list(self.classes[self._known(name)])

    def as_classes(self) -> list[tuple[str, list[Path]]]:
        """(name, files) per class, for `demo.uploads.import_class_files`."""
        with self._lock:
            return [(name, list(paths)) for name, paths in self.classes.items()]

    def disk_bytes(self) -> int:
        with self._lock:
            paths = [path for paths in self.classes.values() for path in paths]
        return sum(path.stat().st_size for path in paths if path.exists())

    def _known(self, name: str) -> str:
        if name not in self.classes:
            raise ConfigError(f"no class {shown_name(str(name))} here; add it first.")
        return name


class TeachStore:
    """Every session's `TeachSession`, under one root folder, within session, size and age limits."""

    def __init__(
        self,
        root: Path,
        max_sessions: int = MAX_SESSIONS,
        max_bytes: int = MAX_STORE_BYTES,
        ttl_s: float = SESSION_TTL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root)
        self.max_sessions = max_sessions
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._sessions: dict[str, TeachSession] = {}
        self._lock = threading.Lock()
        shutil.rmtree(self.root, ignore_errors=True)  # sessions of a previous server process are gone
        self.root.mkdir(parents=True, exist_ok=True)

    def session(self, session_hash: str | None) -> TeachSession:
        """The session's classes, created empty on first use; older sessions past the limits are dropped."""
        if not session_hash:
            raise ConfigError("this needs a browser session; reload the page.")
        key = hashlib.sha256(session_hash.encode()).hexdigest()[:24]
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = TeachSession(self.root / key)
                self._sessions[key] = session
            session.touched = self._clock()
        self.sweep(keep=key)
        return session

    def drop(self, session_hash: str | None) -> None:
        """Forget a session and delete its images (the page was closed)."""
        if not session_hash:
            return
        key = hashlib.sha256(session_hash.encode()).hexdigest()[:24]
        with self._lock:
            session = self._sessions.pop(key, None)
        if session is not None:
            shutil.rmtree(session.folder, ignore_errors=True)

    def sweep(self, keep: str = "") -> list[str]:
        """Drop expired sessions, then the least recently used ones past the count and size limits."""
        now = self._clock()
        with self._lock:
            by_age = sorted(self._sessions.items(), key=lambda item: item[1].touched)
            doomed = [key for key, s in by_age if key != keep and now - s.touched > self.ttl_s]
            alive = [(key, s) for key, s in by_age if key not in doomed]
            count, total = len(alive), sum(s.disk_bytes() for _, s in alive)
            for key, session in alive:  # least recently used first
                if count <= self.max_sessions and total <= self.max_bytes:
                    break
                if key != keep:
                    doomed.append(key)
                    count, total = count - 1, total - session.disk_bytes()
            removed = [self._sessions.pop(key) for key in doomed]
        for session in removed:
            shutil.rmtree(session.folder, ignore_errors=True)
        return doomed

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
