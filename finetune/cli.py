"""Shared CLI plumbing: logging setup; a `StudioError` becomes one line on stderr and exit status 2."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from finetune.errors import StudioError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def configure_logging(quiet: bool = False) -> None:
    """Only entry points configure logging; library modules just log."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("timm", "httpx", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_cli(body: Callable[[], int]) -> int:
    """Run a CLI body: user errors print `error: <message>` and exit 2; bugs keep their traceback."""
    try:
        return body()
    except StudioError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
