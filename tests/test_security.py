"""Attacks on the real app on 127.0.0.1, sent as raw payloads: no server file is read, no path is disclosed.

Every endpoint that takes an image or a file (classify, explain, batch, detect, segment, train with a zip
or with class files) gets payloads that name a file the test wrote outside Gradio's upload folder, and the
same payloads naming a file that does not exist: each is refused, with the same answer for both, and
nothing of the file comes back. The file routes are probed for the same file. Out-of-range inputs get a
clear message, and the pages a visitor loads name no server path.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import gradio as gr
import httpx
import pytest
from app_server import launched
from conftest import TINY_MODEL, photo
from vision_models import random_vision_service

import app
from demo import train_tab
from demo.service import InferenceService
from demo.train_tab import CLASSES_SOURCE
from demo.training_jobs import TrainingManager
from demo.ui import NOT_AN_UPLOAD, public_message, upload_folder, uploaded_paths
from finetune.errors import ImageError

pytestmark = pytest.mark.app

FILE_DATA = {"_type": "gradio.FileData"}
TIMEOUT_S = 120


@pytest.fixture(scope="module")
def secret(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private photo outside the upload folder (a PNG, so a returned copy would match pixel for pixel)."""
    path = tmp_path_factory.mktemp("private") / "secret.png"
    photo("chelsea").resize((96, 64)).save(path)
    assert not path.resolve().is_relative_to(upload_folder())
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, untrained_run_dir: Path) -> Iterator[dict[str, Any]]:
    """Every tab of the app: a tiny run, random-init detector and segmenter, and the Train tab."""
    root = tmp_path_factory.mktemp("served")
    service = InferenceService.from_checkpoint(untrained_run_dir)
    vision = random_vision_service(root / "weights")
    manager = TrainingManager(root / "studio-data", allow_test_models=True)
    try:
        with launched(service, vision, trainer=manager) as demo:
            collect = [index for index, fn in demo.fns.items() if fn.fn is train_tab.collect_classes]
            with httpx.Client(base_url=demo.local_url.rstrip("/"), timeout=TIMEOUT_S) as client:
                yield {"client": client, "collect_fn": collect[0], "weights": root / "weights"}
    finally:
        manager.close()
        service.close()


def call(client: httpx.Client, api_name: str, data: list[Any]) -> tuple[str, Any, str]:
    """POST to `/gradio_api/call/<api_name>`, read its event stream: (last event, its data, whole text)."""
    body = json.dumps({"data": data})  # Python's JSON writes Infinity and NaN, as a hostile caller may
    posted = client.post(
        f"/gradio_api/call/{api_name}", content=body, headers={"Content-Type": "application/json"}
    )
    if posted.status_code == 422:  # demo/admission.py refused it before it took a queue slot
        detail = posted.json()["detail"]
        message = " ".join(item["message"] for item in detail if item.get("is_valid") is False)
        return "error", {"error": message}, posted.text
    assert posted.status_code == 200, posted.text
    stream = client.get(f"/gradio_api/call/{api_name}/{posted.json()['event_id']}").text
    events = [line.removeprefix("event: ") for line in stream.splitlines() if line.startswith("event: ")]
    payloads = [line.removeprefix("data: ") for line in stream.splitlines() if line.startswith("data: ")]
    last = json.loads(payloads[-1]) if payloads else None
    return events[-1], last, stream


def refusal(event: str, data: Any) -> str | None:
    """The message of an error event (None when Gradio refused without one); fails on any other answer."""
    assert event == "error", f"not refused: {event} {str(data)[:200]}"
    return data.get("error") if isinstance(data, dict) else data


@pytest.fixture(scope="module", autouse=True)
def links_folder() -> Iterator[Path]:
    """Where the tests put symlinks inside the upload folder; removed afterwards."""
    folder = upload_folder() / f"studio-security-{os.getpid()}"
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def attacks(target: Path, base_url: str) -> dict[str, Any]:
    """Payloads that name `target`, a file on the server, in every way a caller could try."""
    folder = upload_folder()
    link = folder / f"studio-security-{os.getpid()}" / f"{target.stem}.png"
    link.unlink(missing_ok=True)
    link.symlink_to(target)  # a link inside the upload folder that points out of it
    dotted = f"{folder}/{os.path.relpath(target, folder)}"  # inside the folder, then ../ out of it
    return {
        "url": {"url": str(target), "meta": FILE_DATA},
        "url_with_null_path": {"path": None, "url": str(target), "meta": FILE_DATA},
        "path": {"path": str(target)},
        "path_with_meta": {"path": str(target), "meta": FILE_DATA},
        "bare_string": str(target),
        "file_route_url": {"url": f"{base_url}/gradio_api/file={target}", "meta": FILE_DATA},
        "relative_file_route_url": {"url": f"/gradio_api/file={target}", "meta": FILE_DATA},
        "old_file_route_url": {"url": f"/file={target}", "meta": FILE_DATA},
        "file_route_path": {"path": f"{base_url}/gradio_api/file={target}", "meta": FILE_DATA},
        "dot_dot_path": {"path": dotted},
        "symlink_path": {"path": str(link)},
        "symlink_path_with_meta": {"path": str(link), "meta": FILE_DATA},
    }


def endpoint_data(endpoint: str, payload: Any) -> tuple[str, list[Any]]:
    """(api_name, data) that sends `payload` where the endpoint takes its image or file."""
    return {
        "classify": ("classify", [payload, 3]),
        "explain": ("explain", [payload, "", 0.0]),  # opacity 0: the overlay would be the photo itself
        "detect": ("detect", [payload, 0.5]),
        "segment": ("segment", [payload, 0.0]),
        "batch": ("batch", [[payload]]),
        "train_zip": ("train", [payload, TINY_MODEL, "auto", 1, 5]),
        "live": ("live", [payload]),
        "teach_images": ("teach_add_images", ["cat", [payload]]),
    }[endpoint]


def data_url(image_bytes: bytes) -> dict[str, Any]:
    return {"url": "data:image/png;base64," + base64.b64encode(image_bytes).decode(), "meta": FILE_DATA}


@pytest.mark.parametrize(
    "endpoint", ["classify", "explain", "detect", "segment", "batch", "train_zip", "live", "teach_images"]
)
def test_payloads_naming_server_files_are_refused_alike_and_return_nothing(
    server: dict[str, Any], secret: Path, endpoint: str
) -> None:
    client = server["client"]
    base_url = str(client.base_url)
    existing, missing = attacks(secret, base_url), attacks(secret.with_name("missing.png"), base_url)
    ours = 0
    for kind in existing:
        answers = []
        for payload in (existing[kind], missing[kind]):
            event, data, stream = call(client, *endpoint_data(endpoint, payload))
            answers.append(refusal(event, data))
            assert secret.parent.name not in stream, f"{endpoint}/{kind} named the file: {stream[:300]}"
        assert answers[0] == answers[1], f"{endpoint}/{kind}: existing and missing files answered differently"
        assert answers[0] in (NOT_AN_UPLOAD, None), f"{endpoint}/{kind}: {answers[0]}"
        ours += answers[0] == NOT_AN_UPLOAD
    if endpoint in ("classify", "explain", "detect", "segment", "live"):
        # url, path without meta, file-route urls, ../ and the symlink reach our check (Gradio passes them)
        assert ours >= 8, f"{endpoint}: only {ours} payloads got the app's message"


def test_class_file_uploads_naming_server_files_are_refused_alike(
    server: dict[str, Any], secret: Path
) -> None:
    client = server["client"]
    answers: dict[str, list[Any]] = {}
    for target in (secret, secret.with_name("missing.png")):
        for kind, payload in attacks(target, str(client.base_url)).items():
            data = [CLASSES_SOURCE, "cat, dog", [payload], [payload], None, None, None, None]
            response = client.post(
                "/gradio_api/run/predict", json={"data": data, "fn_index": server["collect_fn"]}
            )
            assert response.status_code != 200, f"{kind}: class files accepted: {response.text[:200]}"
            assert str(secret.parent) not in response.text
            answers.setdefault(kind, []).append(response.json().get("error"))
    for kind, (existing, missing) in answers.items():
        assert existing == missing and existing in (NOT_AN_UPLOAD, None), f"{kind}: {existing} / {missing}"


def test_a_data_url_is_an_accepted_upload(server: dict[str, Any], secret: Path) -> None:
    event, data, _ = call(server["client"], "classify", [data_url(secret.read_bytes()), 2])
    assert event == "complete" and len(data[0]["confidences"]) == 2
    event, data, _ = call(
        server["client"], "classify", [{"url": "data:image/png;base64,", "meta": FILE_DATA}, 2]
    )
    assert refusal(event, data) == "the inline image is empty; send a photo."


def file_routes(target: Path) -> list[str]:
    folder, cwd_file = upload_folder(), Path(app.__file__).resolve()
    dotted = f"{folder}/{os.path.relpath(target, folder)}"
    return [
        f"/file={target}",
        f"/gradio_api/file={target}",
        f"/gradio_api/file/{target}",
        f"/gradio_api/file={quote(str(target), safe='')}",
        f"/gradio_api/file={dotted}",
        f"/gradio_api/file={dotted.replace('..', '%2e%2e')}",
        f"/gradio_api/file={cwd_file}",  # the app's own source, in the working directory
        f"/gradio_api/file={cwd_file.parent / '.git' / 'config'}",
    ]


def test_file_routes_do_not_serve_files_outside_the_allowed_folders(
    server: dict[str, Any], secret: Path
) -> None:
    client, content = server["client"], secret.read_bytes()
    for route in file_routes(secret):
        response = client.get(route)
        assert response.status_code in (403, 404), f"{route}: {response.status_code}"
        assert content not in response.content


@pytest.mark.parametrize(
    ("api_name", "data", "message"),
    [
        ("classify", ["IMAGE", 1000], r"^k must be a whole number from 1 to 20, got 1000\.$"),
        ("classify", ["IMAGE", "Infinity"], r"^k must be a whole number from 1 to 20, got 'Infinity'\.$"),
        ("classify", ["IMAGE", float("inf")], r"^k must be a whole number from 1 to 20, got inf\.$"),
        ("classify", ["IMAGE", float("nan")], r"^k must be a whole number from 1 to 20, got nan\.$"),
        ("classify", ["IMAGE", 2.5], r"^k must be a whole number from 1 to 20, got 2\.5\.$"),
        ("explain", ["IMAGE", "x" * 10_000_000, 0.5], "more than 10,000 characters"),  # before the queue
        ("explain", ["IMAGE", "x" * 5_000, 0.5], "at most 200 are accepted"),
        ("explain", ["IMAGE", "teacup", 0.5], "unknown class 'teacup'"),
        ("explain", ["IMAGE", "", 1.5], r"^opacity must be a number from 0 to 1, got 1\.5\.$"),
        ("detect", ["IMAGE", 5], r"^threshold must be a number from 0 to 1, got 5\.$"),
        ("segment", ["IMAGE", "0.5"], r"^opacity must be a number from 0 to 1, got '0\.5'\.$"),
        # Gradio checks these two itself (their events preprocess); the handler checks them for direct calls
        (
            "train",
            [None, TINY_MODEL, "auto", 1000, 5],
            "from 0 to 200|1000 is greater than maximum value 200",
        ),
        ("train", [None, TINY_MODEL, "auto", 1, 1e9], "from 1 to 120|greater than maximum value 120"),
    ],
    ids=lambda value: str(value)[:24],
)
def test_inputs_outside_the_ui_ranges_get_a_clear_message(
    server: dict[str, Any],
    secret: Path,
    caplog: pytest.LogCaptureFixture,
    api_name: str,
    data: list,
    message: str,
) -> None:
    image = data_url(secret.read_bytes())
    with caplog.at_level(logging.INFO):
        event, answer, _ = call(
            server["client"], api_name, [image if item == "IMAGE" else item for item in data]
        )
    assert re.search(message, refusal(event, answer)), refusal(event, answer)
    assert all(len(record.getMessage()) < 2_000 for record in caplog.records)  # a 10 MB text is never logged


def test_train_handler_checks_epochs_and_budget_before_any_work(tmp_path: Path) -> None:
    manager = TrainingManager(tmp_path / "studio-data", allow_test_models=True)
    try:
        for epochs, budget, message in (
            (1000, 5, "epochs must be a whole number from 0 to 200, got 1000"),
            (1, float("inf"), "must be a number from 1 to 120, got inf"),
        ):
            with pytest.raises(gr.Error, match=re.escape(message)):
                next(train_tab.train(manager, "/etc/passwd", TINY_MODEL, "auto", epochs, budget))
        with pytest.raises(gr.Error, match=re.escape(NOT_AN_UPLOAD)):
            next(train_tab.train(manager, "/etc/passwd", TINY_MODEL, "auto", 1, 5))
    finally:
        manager.close()


def test_pages_and_messages_name_no_server_paths(
    server: dict[str, Any], untrained_run_dir: Path, secret: Path
) -> None:
    config = server["client"].get("/config").text
    assert str(server["weights"]) not in config and str(untrained_run_dir) not in config
    assert "weights from file '…/detector.safetensors'" in config
    assert f"run `{untrained_run_dir.name}`" in config  # the model card names the run, not its folder
    assert public_message(f"Scanning {secret.parent}/data.") == "Scanning …/data."
    assert public_message("from https://download.pytorch.org/models/a.pth, 1/2 done") == (
        "from https://download.pytorch.org/models/a.pth, 1/2 done"
    )


def test_file_inputs_take_only_regular_files_inside_the_upload_folder(
    secret: Path, links_folder: Path
) -> None:
    """Gradio refuses these itself before a file input's handler runs; the handlers check again."""
    inside = links_folder / "inside.png"
    shutil.copy(secret, inside)
    assert uploaded_paths([str(inside), {"path": str(inside)}]) == [inside.resolve()] * 2
    link = links_folder / "link.png"
    link.unlink(missing_ok=True)
    link.symlink_to(secret)
    for bad in (
        str(secret),
        str(link),
        f"{links_folder}/../{os.path.relpath(secret, links_folder.parent)}",
        str(links_folder / "missing.png"),
        str(links_folder),
        {"url": str(secret)},
        "",
        "a\0b",
        42,
    ):
        with pytest.raises(ImageError) as refused:
            uploaded_paths([str(inside), bad])
        assert str(refused.value) == NOT_AN_UPLOAD
