"""User-facing exceptions: the only place they are defined.

Every error a user can cause (a bad folder, a bad image, a bad checkpoint, a bad option, weights that
cannot be had offline) is a `StudioError`, so CLIs can print one line and exit 2, and the app can show a
modal, while real bugs keep their tracebacks.
"""

from __future__ import annotations


class StudioError(Exception):
    """Raised when the user's input or environment prevents the work; the message says how to fix it."""


class DatasetError(StudioError, ValueError):
    """Raised when a dataset folder is missing, malformed or has too few usable images."""


class ImageError(StudioError, ValueError):
    """Raised when a file cannot be used as an image (not an image, truncated, empty, too large)."""


class CheckpointError(StudioError, ValueError):
    """Raised when a run folder is missing, incomplete, tampered with or of an unknown format."""


class ConfigError(StudioError, ValueError):
    """Raised when an option has a bad value, such as an unknown model name or a negative learning rate."""


class WeightsUnavailableError(StudioError, RuntimeError):
    """Raised when pretrained weights cannot be had (offline, no local file)."""


class RuntimeUnavailableError(StudioError, RuntimeError):
    """Raised when an optional runtime (such as onnxruntime) is requested but not installed."""


class StoppedError(StudioError):
    """Raised when `should_stop` ends a run while it decodes images or extracts features, before any
    checkpoint exists (cancel, or the time budget spent)."""
