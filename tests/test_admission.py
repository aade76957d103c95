"""Admission control on the real server: one client cannot fill the queue, and bad input takes no slot.

Explain is made slow on purpose (it waits for a gate the test opens at the end), so the flood stays in the
queue while the test looks: that is the one stand-in; the server, its queue, the uploads and the model are
real. Without admission control the flood below (over 64 explain requests) fills Gradio's global queue and
the second visitor's classify is refused with "Queue is full".
"""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from app_server import serve
from gradio_client import Client, handle_file
from gradio_client.exceptions import ValidationError

import app
from demo.admission import AdmissionLimits, check_inputs
from demo.service import InferenceService
from finetune.errors import ConfigError

pytestmark = pytest.mark.app

EXAMPLES = Path(__file__).resolve().parents[1] / "demo" / "examples"
GATE_TIMEOUT_S = 120  # a gated explain gives up after this, so a failing test cannot hang the server
LIMITS = AdmissionLimits()


class GatedService(InferenceService):
    """The real service whose Explain waits until the test opens the gate (a slow request, on demand)."""

    gate = threading.Event()
    is_closing = False  # set at teardown: the flood left in the queue then ends at once, without a model

    def explain(self, *args: Any, **kwargs: Any) -> Any:
        self.gate.wait(GATE_TIMEOUT_S)
        if self.is_closing:
            raise ConfigError("the test server is closing.")
        return super().explain(*args, **kwargs)


@pytest.fixture(scope="module")
def url(untrained_run_dir: Path) -> Iterator[str]:
    service = GatedService.from_checkpoint(untrained_run_dir, runtime="torch")
    GatedService.gate.clear()
    try:
        with serve(service) as local_url:
            yield local_url
    finally:
        GatedService.is_closing = True
        GatedService.gate.set()
        service.close()


def fn_index(url: str, api_name: str) -> int:
    config = httpx.get(f"{url}config", timeout=30).json()
    return next(dep["id"] for dep in config["dependencies"] if dep.get("api_name") == api_name)


def upload(url: str, path: Path) -> dict[str, Any]:
    """The file payload a browser sends after uploading `path`."""
    with path.open("rb") as handle:
        response = httpx.post(f"{url}gradio_api/upload", files={"files": (path.name, handle)}, timeout=30)
    response.raise_for_status()
    return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}


def join(url: str, index: int, data: list[Any], session_hash: str) -> httpx.Response:
    """One POST to the queue, as a client that never listens for its answer would flood it."""
    body = {"data": data, "fn_index": index, "session_hash": session_hash, "event_data": None}
    return httpx.post(f"{url}gradio_api/queue/join", json=body, timeout=30)


def join_at_once(url: str, index: int, data: list[Any], session_hashes: list[str]) -> list[httpx.Response]:
    """The same joins sent concurrently, one per session hash, as an async flooder would."""

    async def flood() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            bodies = [
                {"data": data, "fn_index": index, "session_hash": h, "event_data": None}
                for h in session_hashes
            ]
            return list(
                await asyncio.gather(*(client.post(f"{url}gradio_api/queue/join", json=b) for b in bodies))
            )

    return asyncio.run(flood())


def refusal(response: httpx.Response) -> str:
    assert response.status_code == 422, response.text
    return " ".join(item["message"] for item in response.json()["detail"] if item.get("is_valid") is False)


def test_a_flood_from_one_client_leaves_classify_to_everyone_else(url: str) -> None:
    explain = fn_index(url, "explain")
    image = upload(url, EXAMPLES / "chelsea.jpg")
    flooder = Client(url, verbose=False)
    answers = join_at_once(url, explain, [image, "", 0.5, None], [flooder.session_hash] * 60)
    admitted = [response for response in answers if response.status_code == 200]
    assert len(admitted) == LIMITS.per_session  # 1 running + 3 waiting; the other 56 took no slot
    refused = [response for response in answers if response.status_code != 200]
    assert all("you already have 4 requests waiting or running" in refusal(item) for item in refused)
    with pytest.raises(ValidationError, match="you already have 4 requests .* wait for them to finish"):
        flooder.predict(handle_file(EXAMPLES / "coffee.jpg"), 2, api_name="/classify")

    # The same flood with a new session hash per request: the explain waiting cap holds it.
    rotated = join_at_once(url, explain, [image, "", 0.5, None], [uuid.uuid4().hex for _ in range(70)])
    assert sum(response.status_code == 200 for response in rotated) <= LIMITS.waiting["explain"]
    refused = [response for response in rotated if response.status_code != 200]
    assert refused and all("explain requests are already waiting" in refusal(item) for item in refused)
    assert len(answers) + len(rotated) > app.QUEUE_MAX_SIZE  # enough to fill the queue without the caps

    visitor = Client(url, verbose=False)
    result = visitor.predict(handle_file(EXAMPLES / "coffee.jpg"), 2, api_name="/classify")
    assert len(result["confidences"]) == 2  # served while the flood waits
    with pytest.raises(ValidationError, match="explain requests are already waiting"):
        visitor.predict(handle_file(EXAMPLES / "chelsea.jpg"), "", 0.5, api_name="/explain")


@pytest.mark.parametrize(
    ("api_name", "data", "message"),
    [  # the last value of each is the hidden per-session model choice (a gr.State input)
        ("classify", [None, 5, None], "no image"),
        ("explain", [{"path": "x.jpg"}, "x" * 20_000, 0.5, None], "more than 10,000 characters"),
        ("batch", [[{"path": f"{n}.jpg"} for n in range(201)], None], "201 files in one batch"),
        ("batch", [[], None], "no files"),
        ("classify", [[1, 2], 5, None], "takes an uploaded file"),
    ],
)
def test_obviously_bad_input_is_refused_before_the_queue(
    url: str, api_name: str, data: list[Any], message: str
) -> None:
    assert message in (check_inputs(api_name, data)[1] or "")
    assert message in refusal(join(url, fn_index(url, api_name), data, uuid.uuid4().hex))


def test_a_request_with_the_wrong_number_of_inputs_takes_no_slot(url: str) -> None:
    response = join(url, fn_index(url, "classify"), [None], uuid.uuid4().hex)
    assert "needs 3 inputs, got 1" in refusal(response)


def test_an_inline_image_may_be_long_but_no_larger_than_an_upload() -> None:
    header = "data:image/png;base64,"
    assert check_inputs("classify", [header + "A" * 50_000, 5]) == (0, None)
    index, message = check_inputs("explain", [None, "cat", header + "A" * (29 * 2**20)])
    assert index == 2 and "larger than an upload may be" in (message or "")


def test_the_per_session_cap_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STUDIO_SESSION_REQUESTS", "9")
    assert AdmissionLimits.from_env().per_session == 9
    monkeypatch.setenv("STUDIO_SESSION_REQUESTS", "many")
    with pytest.raises(ConfigError, match="STUDIO_SESSION_REQUESTS='many' must be a whole number"):
        AdmissionLimits.from_env()
