"""Admission control in front of Gradio's queue: who may take a queue slot, decided before they take it.

Gradio's queue has one global size (app.py `QUEUE_MAX_SIZE`): 2 slow Explain calls plus 63 instant-failing
ones from one client filled it, and every other visitor got "Queue is full". Three rules run before a request
is queued, each refusal a clear message the browser shows under the input and `gradio_client` raises as a
`ValidationError`:

1. **Per session**: at most `per_session` requests of one browser session queued or running at once.
2. **Per expensive endpoint**: Explain, Batch, Detect and Segment each have their own cap on *waiting*
   requests, so together they cannot crowd Classify out of the global queue.
3. **Obviously bad input**: a missing image, too many batch files, the wrong number of inputs or a huge
   text field is refused without a slot. Deeper checks (is the upload really Gradio's, is the image
   decodable) stay in the handlers (`demo/ui.py`, `finetune/images.py`).

Hook: `install_admission` wraps the blocks' `Queue.push`. Both ways into the queue, `POST
/gradio_api/queue/join` and the `/call/<api_name>` routes, go through `push`, which receives the parsed
body with `fn_index` resolved, the session hash and the inputs; the queue's own state tells what a session has
queued or running (plus the joins still inside `push`), so no second count can drift from Gradio's. An ASGI
middleware on the join route would miss `/call/`, re-parse the body, and still need the queue's state (and
Starlette refuses middleware added after start-up). Refusals use `push`'s own
"validator_error" result, the path Gradio takes for an event's `validator`, so both clients show the message.
Counted per session hash, which the client chooses: a client rotating hashes escapes rule 1, but rule 2
and the global queue size still bound what it can hold.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import wraps
from typing import Any

import gradio as gr
from gradio import queueing

from demo.service import MAX_BATCH_FILES
from finetune.errors import ConfigError

logger = logging.getLogger(__name__)

MAX_TEXT_CHARS = 10_000  # a text input longer than this is not a class name or a number typed in the UI
MAX_INLINE_IMAGE_CHARS = 28 * 1024 * 1024  # base64 of a 20 MB image (app.py MAX_FILE_SIZE)
SESSION_ENV = "STUDIO_SESSION_REQUESTS"
IMAGE_ENDPOINTS = frozenset({"classify", "explain", "detect", "segment", "live"})  # first input: the image


@dataclass(frozen=True)
class AdmissionLimits:
    """How much of the queue one session, and each expensive endpoint, may hold."""

    per_session: int = 4  # queued + running requests of one browser session
    waiting: dict[str, int] = field(  # waiting (not yet running) requests per expensive endpoint
        default_factory=lambda: {
            "explain": 8,
            "batch": 4,
            "detect": 8,
            "segment": 8,
            "teach_add_images": 8,  # decodes up to a class's worth of uploads
            "teach_export_onnx": 2,  # an ONNX export takes seconds of a core
        }
    )
    exempt: frozenset[str] = frozenset({"cancel_training"})  # must get through even with a full session

    @classmethod
    def from_env(cls) -> AdmissionLimits:
        """The defaults, with $STUDIO_SESSION_REQUESTS (requests per session) when the operator sets it."""
        text = os.environ.get(SESSION_ENV, "").strip()
        if not text:
            return cls()
        if not text.isdigit() or int(text) < 1:
            raise ConfigError(f"{SESSION_ENV}={text!r} must be a whole number of requests, at least 1.")
        return cls(per_session=int(text))


class Admission:
    """Decides whether a request may join the queue; `install` puts it in front of the queue of `blocks`."""

    def __init__(self, blocks: gr.Blocks, limits: AdmissionLimits | None = None) -> None:
        self.blocks = blocks
        self.limits = limits or AdmissionLimits.from_env()
        # Requests admitted whose `push` has not returned yet, by ("session", hash) and ("api", name): counted
        # with the queue's own, so concurrent joins cannot all slip in before the first lands in the queue.
        self._joining: Counter[tuple[str, str]] = Counter()

    def install(self) -> None:
        """Wrap the blocks' queue (call after `blocks.queue(...)`, which creates a new queue)."""
        queue = self.blocks._queue
        push = queue.push

        @wraps(push)
        async def admitted_push(body: Any, request: Any, username: str | None) -> Any:
            refusal = self.check(body)
            if refusal is not None:
                return False, refusal, "validator_error"
            keys = self._keys(body)
            self._joining.update(keys)
            try:
                return await push(body, request, username)
            finally:
                self._joining.subtract(keys)
                for key in keys:
                    if self._joining[key] <= 0:
                        del self._joining[key]  # one entry per session would otherwise stay forever

        queue.push = admitted_push  # type: ignore[method-assign]

    def check(self, body: Any) -> list[dict[str, Any]] | None:
        """None to admit `body` (a queue-join body), else Gradio's validation list naming the refusal."""
        if body.fn_index is None or body.fn_index not in self.blocks.fns:
            return None  # Gradio refuses it with its own message
        fn = self.blocks.fns[body.fn_index]
        data = body.data if isinstance(body.data, list) else None
        index, message = self._refusal(fn, body.session_hash, data)
        if message is None:
            return None
        logger.info("Refused %s from session %s: %s", fn.api_name, str(body.session_hash)[:8], message)
        results = [gr.validate(True, "") for _ in fn.inputs] or [gr.validate(True, "")]
        results[min(index, len(results) - 1)] = gr.validate(False, message)
        return queueing.process_validation_response(results, fn)[1]

    def _refusal(self, fn: Any, session_hash: str | None, data: list[Any] | None) -> tuple[int, str | None]:
        """(input index to show the message at, message) for the first rule `fn` breaks, or (0, None)."""
        api_name = fn.api_name or ""
        if data is None or len(data) != len(fn.inputs):
            got = "no list" if data is None else f"{len(data)}"
            return 0, f"this request needs {len(fn.inputs)} inputs, got {got}; send one value per input."
        index, message = check_inputs(api_name, data)
        if message is not None:
            return index, message
        if api_name in self.limits.exempt:
            return 0, None
        queue = self.blocks._queue
        if session_hash is not None:
            held = self._joining[("session", session_hash)] + sum(
                1 for event in _queued_or_running(queue) if event.session_hash == session_hash
            )
            if held >= self.limits.per_session:
                return 0, (
                    f"you already have {held} requests waiting or running; wait for them to finish "
                    f"(at most {self.limits.per_session} at a time per visitor)."
                )
        cap = self.limits.waiting.get(api_name)
        if cap is not None:
            waiting = self._joining[("api", api_name)] + sum(
                1 for event in _waiting(queue) if event.fn.api_name == api_name
            )
            if waiting >= cap:
                return 0, (
                    f"{waiting} {api_name} requests are already waiting, the most this server queues; "
                    "try again in a minute (Classify is not affected)."
                )
        return 0, None

    def _keys(self, body: Any) -> list[tuple[str, str]]:
        fn = self.blocks.fns.get(body.fn_index)
        keys = [("api", fn.api_name)] if fn is not None and fn.api_name else []
        return keys + ([("session", body.session_hash)] if body.session_hash is not None else [])


def install_admission(blocks: gr.Blocks, limits: AdmissionLimits | None = None) -> Admission:
    """Put admission control in front of `blocks`' queue (limits from the environment unless given)."""
    admission = Admission(blocks, limits)
    admission.install()
    return admission


def check_inputs(api_name: str, data: list[Any]) -> tuple[int, str | None]:
    """Cheap checks on raw inputs, before any slot or decode: (index of the bad input, message) or (0, None).

    Only shapes and sizes: whether an upload is really Gradio's, or a decodable image, is for the handler.
    """
    for index, value in enumerate(data):
        for text in _strings(value):
            if text.startswith("data:") and len(text) > MAX_INLINE_IMAGE_CHARS:
                return index, "the inline image is larger than an upload may be (20 MB); send a smaller one."
            if not text.startswith("data:") and len(text) > MAX_TEXT_CHARS:
                return index, (
                    f"input {index + 1} holds more than {MAX_TEXT_CHARS:,} characters; "
                    "send files as uploads and keep text fields short."
                )
    if api_name in IMAGE_ENDPOINTS and data:
        image = data[0]
        if image is None or image == "" or image == {}:
            return 0, "no image; upload a photo, paste one or take one with the webcam first."
        if not isinstance(image, (dict, str)):
            return 0, f"the image input takes an uploaded file, not a {type(image).__name__}."
    if api_name == "batch" and data:
        files = data[0]
        if not files:
            return 0, "no files to classify; upload one or more images."
        if not isinstance(files, list):
            return 0, "the files input takes a list of uploaded files."
        if len(files) > MAX_BATCH_FILES:
            return 0, f"{len(files)} files in one batch; send at most {MAX_BATCH_FILES} at a time."
    return 0, None


def _strings(value: Any, depth: int = 0) -> Iterable[str]:
    """Every string inside a JSON value (payloads nest at most a few levels: file dicts in lists)."""
    if isinstance(value, str):
        yield value
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            yield from _strings(item, depth + 1)
    elif depth < 4 and isinstance(value, list):
        for item in value:
            yield from _strings(item, depth + 1)


def _waiting(queue: Any) -> Iterable[Any]:
    for event_queue in queue.event_queue_per_concurrency_id.values():
        yield from event_queue.queue


def _queued_or_running(queue: Any) -> Iterable[Any]:
    yield from _waiting(queue)
    for job in queue.active_jobs:
        yield from job or []
