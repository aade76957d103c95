"""The Teach tab: per-session classes on bounded disk, capture bursts, training on the one engine, `live`.

Store and session rules are checked directly; the flow runs on the real app on 127.0.0.1 through
gradio_client with uploaded frames (no camera), training timm's tiny random-init `test_efficientnet` at 64 px
so it takes seconds. The page's webcam stream is driven through Gradio's own stream routes, as the browser
does (gradio_client cannot follow them).
"""

from __future__ import annotations

import base64
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from app_server import free_port
from conftest import TINY_MODEL
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image
from train_data import augmented_crops

import app
from demo.admission import AdmissionLimits, check_inputs
from demo.service import InferenceService
from demo.teach import MAX_IMAGES_PER_CLASS, TeachSession, TeachStore
from demo.train_tab import serve_trained_runs
from demo.training_jobs import TrainingManager
from finetune.checkpoint import load_run
from finetune.errors import ConfigError, DatasetError

TINY_TRAIN = {"img_size": 64, "batch_size": 8, "probe_epochs": 20, "workers": 1}
FRAMES_PER_CLASS = 8


def frame(seed: int = 0, size: int = 96) -> Image.Image:
    return augmented_crops("chelsea", 1, size, seed)[0]


def test_session_refuses_bad_and_duplicate_class_names(tmp_path: Path) -> None:
    session = TeachSession(tmp_path / "s")
    assert session.add_class(" cat ") == "cat"
    with pytest.raises(DatasetError, match="differ only in case"):
        session.add_class("Cat")
    with pytest.raises(DatasetError, match="refused"):
        session.add_class("<b>dog</b>")
    with pytest.raises(ConfigError, match="no class 'dog'"):
        session.add_image("dog", frame())
    assert session.counts() == {"cat": 0}


def test_capture_keeps_a_steady_rate_only_while_the_burst_is_open(tmp_path: Path) -> None:
    session = TeachSession(tmp_path / "s")
    session.add_class("cat")
    assert not session.capture(frame(), now=time.monotonic())  # no burst open
    session.start_capture("cat", seconds=1.0, fps=5.0)
    start = session.capture_window.until - 1.0
    kept = [session.capture(frame(n), now=start + 0.01 + n * 0.05) for n in range(30)]  # 20 a second
    assert sum(kept) == 5  # 5 a second for the 1 s of the burst, the rest skipped
    assert session.counts() == {"cat": 5}
    assert all(max(Image.open(path).size) <= 256 for path in session.images("cat"))
    session.delete_image("cat", 0)
    assert session.counts() == {"cat": 4}


def test_store_keeps_sessions_apart_and_drops_expired_and_closed_ones(tmp_path: Path) -> None:
    now = [0.0]
    store = TeachStore(tmp_path / "teach", max_sessions=2, ttl_s=60, clock=lambda: now[0])
    first, second = store.session("a"), store.session("b")
    first.add_class("cat")
    first.add_image("cat", frame())
    assert second.counts() == {}
    now[0] = 10.0
    assert store.session("a") is first  # now more recent than "b"
    now[0] = 30.0
    store.session("c")  # a third session: the least recently used ("b") goes
    assert len(store) == 2 and store.session("a").counts() == {"cat": 1}
    now[0] = 200.0
    store.session("d")  # "a" and "c" expired
    assert len(store) == 1 and not first.folder.exists()
    store.drop("d")
    assert len(store) == 0 and list((tmp_path / "teach").iterdir()) == []


def test_a_class_holds_at_most_its_cap(tmp_path: Path) -> None:
    session = TeachSession(tmp_path / "s")
    session.add_class("cat")
    tiny = Image.new("RGB", (8, 8))
    for _ in range(MAX_IMAGES_PER_CLASS):
        session.add_image("cat", tiny)
    with pytest.raises(DatasetError, match=f"already has {MAX_IMAGES_PER_CLASS} images"):
        session.add_image("cat", tiny)


def test_admission_refuses_a_live_call_without_a_frame_and_caps_teach_uploads() -> None:
    assert "no image" in (check_inputs("live", [None, None])[1] or "")
    assert "takes an uploaded file" in (check_inputs("live", [[1], None])[1] or "")
    waiting = AdmissionLimits().waiting
    assert waiting["teach_add_images"] >= 1 and waiting["teach_export_onnx"] >= 1


def test_a_pruned_run_is_not_served_again_by_a_late_runtime_upgrade(untrained_run_dir: Path) -> None:
    service = InferenceService(runtime="onnx")
    try:
        service.add_run("gone", load_run(untrained_run_dir), runtime="torch")
        assert service.info("gone").runtime == "torch"
        service.remove_run("gone")  # pruned while its export ran
        service.upgrade_runtime("gone")
        assert "gone" not in service.available_models()
    finally:
        service.close()


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, TrainingManager, InferenceService]]:
    service = InferenceService.from_checkpoint(None)
    manager = TrainingManager(
        tmp_path_factory.mktemp("teach") / "studio-data", allow_test_models=True, train_overrides=TINY_TRAIN
    )
    serve_trained_runs(manager, service)
    demo = app.build_app(service, trainer=manager)
    app.launch(demo, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
    try:
        yield demo.local_url, manager, service
    finally:
        demo.close()
        manager.close()
        service.close()


@pytest.fixture(scope="module")
def frames(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Uploaded "frames": crops of two real photos, one class each."""
    folder = tmp_path_factory.mktemp("frames")
    files: dict[str, list[Path]] = {}
    for label, photo_name in (("cat", "chelsea"), ("coffee", "coffee")):
        files[label] = []
        for n, crop in enumerate(augmented_crops(photo_name, FRAMES_PER_CLASS, 96, seed=len(files))):
            crop.save(folder / f"{label}{n}.jpg", quality=90)
            files[label].append(folder / f"{label}{n}.jpg")
    return files


@pytest.fixture(scope="module")
def taught(served, frames) -> tuple[Client, str, dict]:
    """One visitor who added two classes from uploads and trained: (their client, run id, final metrics)."""
    url, _, _ = served
    client = Client(url, verbose=False)
    for label, paths in frames.items():
        client.predict(label, api_name="/teach_add_class")
        _, _, counts, gallery = client.predict(
            label, [handle_file(path) for path in paths], api_name="/teach_add_images"
        )
        assert counts[label] == FRAMES_PER_CLASS and len(gallery) == FRAMES_PER_CLASS
    run_id, _, metrics = client.predict(TINY_MODEL, 30, api_name="/teach_train")
    return client, run_id, metrics


@pytest.mark.app
def test_teach_api_trains_uploaded_frames_and_live_uses_the_new_model(taught, served, frames) -> None:
    client, run_id, metrics = taught
    _, manager, service = served
    assert metrics["state"] == "done" and metrics["classes"] == ["cat", "coffee"]
    assert 0.0 <= metrics["val_top1"] <= 1.0 and "val_top1" in manager.status(run_id).history[0]
    assert manager.owner_of(run_id) is not None  # the visitor's run, as Train-tab runs are
    answer = client.predict(handle_file(frames["cat"][0]), api_name="/live")
    assert {entry["label"] for entry in answer["confidences"]} == {"cat", "coffee"}
    _, counts, _ = client.predict("cat", 1, api_name="/teach_delete_image")[1:]
    assert counts == {"cat": FRAMES_PER_CLASS - 1, "coffee": FRAMES_PER_CLASS}
    onnx = client.predict(run_id, api_name="/teach_export_onnx")  # waits for the serving export
    assert Path(onnx).name == f"{run_id}.onnx" and Path(onnx).stat().st_size > 10_000
    deadline = time.monotonic() + 60
    while service.info(run_id).runtime == "torch" and time.monotonic() < deadline:
        time.sleep(0.2)  # answered on PyTorch until the child process's export was swapped in
    assert service.info(run_id).runtime.startswith("onnx")
    onnx_answer = client.predict(handle_file(frames["cat"][0]), api_name="/live")
    for ours, theirs in zip(onnx_answer["confidences"], answer["confidences"], strict=True):
        assert ours["label"] == theirs["label"] and ours["confidence"] == pytest.approx(
            theirs["confidence"], abs=1e-3
        )


@pytest.mark.app
def test_another_session_sees_neither_the_classes_nor_the_run(taught, served, frames) -> None:
    url, _, _ = served
    _, run_id, _ = taught
    stranger = Client(url, verbose=False)
    with pytest.raises(AppError, match="no class 'cat'"):
        stranger.predict("cat", [handle_file(frames["cat"][0])], api_name="/teach_add_images")
    with pytest.raises(AppError, match="add at least 2 classes"):
        stranger.predict(TINY_MODEL, 30, api_name="/teach_train")
    with pytest.raises(AppError, match="here for you"):
        stranger.predict(run_id, api_name="/teach_export_onnx")
    answer = stranger.predict(handle_file(frames["cat"][0]), api_name="/live")
    assert "cat" not in {entry["label"] for entry in answer["confidences"]}  # the ImageNet model's classes


@pytest.mark.app
def test_live_answers_frame_after_frame_by_api_and_by_the_page_stream(served, frames) -> None:
    url, _, _ = served
    client = Client(url, verbose=False)
    for path in frames["coffee"][:4]:
        answer = client.predict(handle_file(path), api_name="/live")
        assert len(answer["confidences"]) == 5 and answer["label"]
    payloads = [_data_url(path) for path in (frames["coffee"][0], frames["cat"][0], frames["coffee"][1])]
    answers, last = stream_frames(url, payloads)
    assert len(answers) >= 2 and last["success"]  # frames sent while one is answered may be skipped
    assert all(len(answer["confidences"]) == 5 for answer in answers)


@pytest.mark.app
@pytest.mark.parametrize("key", ["path", "url"])
def test_a_streamed_frame_naming_a_server_file_ends_the_stream_unread(served, frames, key: str) -> None:
    """Frames posted to the stream route skip the queue's admission: the handler checks each one."""
    url, _, _ = served
    secret = {key: str(Path(__file__).resolve()), "meta": {"_type": "gradio.FileData"}}
    answers, last = stream_frames(url, [_data_url(frames["cat"][0]), secret])
    assert len(answers) == 1 and not last["success"]
    assert "test_teach" not in json.dumps(last)
    if key == "url":  # Gradio passes it on; the app's own check refuses it (a path Gradio refuses itself)
        assert "only reads files uploaded to it" in last["output"]["error"]


def stream_frames(url: str, payloads: list) -> tuple[list[dict], dict]:
    """Drive the page's live webcam stream as the browser does: join with the first frame, post the next
    ones to `/gradio_api/stream/<event_id>`, close it; returns every streamed label and the last message."""
    config = httpx.get(f"{url}config", timeout=30).json()
    camera = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "live-camera")
    fn_index = next(d["id"] for d in config["dependencies"] if d["targets"] == [[camera, "stream"]])
    session = uuid.uuid4().hex
    urls = payloads
    body = {"data": [urls[0], None, None], "fn_index": fn_index, "session_hash": session, "event_data": None}
    answers: list[dict] = []
    message: dict = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        event_id = http.post("/gradio_api/queue/join", json=body).json()["event_id"]
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session}) as stream:
            sent = 1
            for line in stream.iter_lines():
                if not line.startswith("data:"):
                    continue
                message = json.loads(line[5:])
                if message.get("msg") == "process_streaming":
                    answers.append(message["output"]["data"][0])
                    if sent < len(urls):
                        next_body = {**body, "data": [urls[sent], None, None]}
                        http.post(f"/gradio_api/stream/{event_id}", json=next_body)
                        sent += 1
                    else:
                        http.post(f"/gradio_api/stream/{event_id}/close")
                if message.get("msg") == "process_completed":
                    break
    return answers, message


def _data_url(path: Path) -> dict:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, "JPEG")
    return {"url": "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode(), "meta": {}}
