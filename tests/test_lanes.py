"""Every visitor in their own lane, on the real app on 127.0.0.1: per-session models, owned runs, pruning
that keeps what is in use, public mode's training limits, and cancel/budget during decoding and probing.

The models are tiny random-init runs with different label sets, so an answer's labels say which model gave it.
"""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from app_server import launched, serve
from conftest import TINY_MODEL, photo, write_digits_folder
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from train_data import photo_zip

import app
from demo import train_tab
from demo.lanes import Lanes
from demo.service import InferenceService
from demo.train_tab import serve_trained_runs
from demo.training_jobs import TrainingManager
from demo.training_status import CANCELLED, RUNNING, TrainLimits, TrainOptions
from finetune.checkpoint import load_run, save_run
from finetune.config import TrainConfig
from finetune.data import scan_dataset
from finetune.engine import TrainEvent
from finetune.errors import ConfigError, StoppedError
from finetune.modeling import create_model_and_transforms
from finetune.pixel_cache import build_cache
from finetune.trainer import fine_tune

pytestmark = pytest.mark.app

ALPHA, BETA, GAMMA = ["apple", "pear"], ["red", "green", "blue"], ["north", "south", "east", "west"]
TINY_TRAIN = {"img_size": 64, "batch_size": 8, "probe_epochs": 20, "workers": 1}
TIMEOUT_S = 240
NOT_YOURS = "here for you"  # the one refusal, alike for a missing run and another visitor's


def tiny_run(folder: Path, labels: list[str]) -> Path:
    """A random-init `test_efficientnet` run folder with `labels`: its answers name only those labels."""
    created = create_model_and_transforms(TINY_MODEL, num_classes=len(labels), weights="none", img_size=32)
    save_run(folder, created.model, labels, created.data_config, {"weights_source": "none"})
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lane_runs")
    return {
        name: tiny_run(root / name, labels)
        for name, labels in (("alpha", ALPHA), ("beta", BETA), ("gamma", GAMMA))
    }


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("lane_image") / "chelsea.png"
    photo("chelsea").resize((96, 64)).save(path)
    return path


@contextmanager
def lane_app(
    runs: dict[str, Path], data_dir: Path, **manager_options
) -> Iterator[tuple[str, InferenceService, TrainingManager]]:
    """The app serving `alpha` (the operator's default) and `beta` (also the operator's), with a Train tab."""
    service = InferenceService(runtime="torch")
    service.add_run("alpha", load_run(runs["alpha"]))
    service.add_run("beta", load_run(runs["beta"]), make_default=False)
    manager = TrainingManager(data_dir, allow_test_models=True, train_overrides=TINY_TRAIN, **manager_options)
    serve_trained_runs(manager, service)
    try:
        with launched(service, trainer=manager) as demo:
            yield demo.local_url, service, manager
    finally:
        manager.close()
        service.close()


def put_run(
    manager: TrainingManager, service: InferenceService, source: Path, run_id: str, owner: str
) -> None:
    """A finished run of `owner`'s in the data folder, served as the Train tab serves a new one."""
    shutil.copytree(source, manager.runs_dir / run_id)
    manager.runs.set_owner(run_id, owner)
    manager.on_model_ready(run_id, manager.runs_dir / run_id)


def labels_of(result: dict) -> set[str]:
    return {entry["label"] for entry in result["confidences"]}


def call_private(url: str, fn_index: int, data: list, session_hash: str) -> list[dict]:
    """Call an event by its index through `/gradio_api/queue/join`, as a hostile client would; returns the
    server's messages for it (the last one says how it ended)."""
    body = {"data": data, "fn_index": fn_index, "session_hash": session_hash, "event_data": None}
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/gradio_api/queue/join", json=body).status_code == 200
        messages = []
        with http.stream("GET", "/gradio_api/queue/data", params={"session_hash": session_hash}) as stream:
            for line in stream.iter_lines():
                if line.startswith("data:"):
                    messages.append(json.loads(line[5:]))
                    if messages[-1].get("msg") == "process_completed":
                        break
    return messages


def download_fn_index(url: str) -> int:
    """The index of the event that fills the Train tab's run-zip download (private: no api_name)."""
    config = httpx.get(f"{url.rstrip('/')}/config", timeout=30).json()
    ids = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "train-download"]
    return next(dep["id"] for dep in config["dependencies"] if ids[0] in dep["outputs"])


def test_two_sessions_use_two_models_at_once_across_50_interleaved_requests(
    runs: dict[str, Path], image: Path, tmp_path: Path
) -> None:
    with lane_app(runs, tmp_path / "studio-data") as (url, _, _):
        first, second = Client(url, verbose=False), Client(url, verbose=False)
        assert first.predict("alpha", api_name="/select_model") == "alpha"
        assert second.predict("beta", api_name="/select_model") == "beta"
        # 25 requests per visitor, interleaved, in rounds of 4 per visitor (the per-session cap of
        # demo/admission.py), so both models answer at the same time.
        for start in range(0, 25, 4):
            jobs = []
            for _ in range(min(4, 25 - start)):
                jobs.append(("alpha", first.submit(handle_file(image), 5, api_name="/classify")))
                jobs.append(("beta", second.submit(handle_file(image), 5, api_name="/classify")))
            for model, job in jobs:
                expected = set(ALPHA if model == "alpha" else BETA)
                assert labels_of(job.result(timeout=120)) == expected
        caption = second.predict(handle_file(image), "", 0.5, api_name="/explain")[2]
        assert any(label in caption for label in BETA) and not any(label in caption for label in ALPHA)
        third = Client(url, verbose=False)  # a new visitor gets the operator's default
        assert labels_of(third.predict(handle_file(image), 5, api_name="/classify")) == set(ALPHA)


def test_a_visitor_cannot_see_select_cancel_or_download_another_visitors_run(
    runs: dict[str, Path], image: Path, tmp_path: Path
) -> None:
    with lane_app(runs, tmp_path / "studio-data", max_queued=2) as (url, service, manager):
        owner, stranger = Client(url, verbose=False), Client(url, verbose=False)
        owner_key = f"s:{owner.session_hash}"
        put_run(manager, service, runs["gamma"], "gamma-run", owner_key)
        # Listing: the menu a page load draws for each visitor.
        assert "gamma-run" in service.lanes.visible(service.available_models(), owner_key)
        assert service.lanes.visible(service.available_models(), f"s:{stranger.session_hash}") == [
            "alpha",
            "beta",
        ]
        # Selecting and serving: a stranger's refusal reads the same as for a run that does not exist.
        with pytest.raises(AppError, match=NOT_YOURS) as refused:
            stranger.predict("gamma-run", api_name="/select_model")
        with pytest.raises(AppError, match=NOT_YOURS) as missing:
            stranger.predict("no-such-run", api_name="/select_model")
        assert str(refused.value).replace("gamma-run", "X") == str(missing.value).replace("no-such-run", "X")
        assert labels_of(stranger.predict(handle_file(image), 5, api_name="/classify")) == set(ALPHA)
        assert owner.predict("gamma-run", api_name="/select_model") == "gamma-run"
        assert labels_of(owner.predict(handle_file(image), 5, api_name="/classify")) == set(GAMMA)
        # Downloading through the private event's index: the owner's session gets the zip, others nothing.
        fn_index = download_fn_index(url)
        theirs = call_private(url, fn_index, ["gamma-run", None, None], "strangersession1")
        assert theirs[-1]["success"] is False and NOT_YOURS in json.dumps(theirs[-1])
        assert ".zip" not in json.dumps(theirs)
        mine = call_private(url, fn_index, ["gamma-run", None, None], owner.session_hash)
        assert mine[-1]["success"] is True and "gamma-run.zip" in json.dumps(mine[-1])
        zip_path = Path(train_tab.zip_for_download(manager, "gamma-run"))
        written = zip_path.stat().st_mtime_ns
        assert train_tab.zip_for_download(manager, "gamma-run") == str(zip_path)  # one zip per run, reused
        assert zip_path.stat().st_mtime_ns == written
        # Cancelling: only the owner's session stops its training.
        data = write_digits_folder(tmp_path / "digits", per_class=8)
        run_id = manager.submit(data, ["digit_0", "digit_1", "digit_2"], TrainOptions(TINY_MODEL), owner_key)
        with pytest.raises(AppError, match=NOT_YOURS):
            stranger.predict(run_id, api_name="/cancel_training")
        assert not manager.status(run_id).is_finished
        owner.predict(run_id, api_name="/cancel_training")
        assert manager.wait_until_finished(run_id, timeout_s=TIMEOUT_S).state == CANCELLED


def test_pruning_keeps_a_run_a_session_is_using(runs: dict[str, Path], tmp_path: Path) -> None:
    with lane_app(runs, tmp_path / "studio-data") as (url, service, manager):
        client = Client(url, verbose=False)
        key = f"s:{client.session_hash}"
        put_run(manager, service, runs["gamma"], "older-run", key)
        time.sleep(0.05)
        put_run(manager, service, runs["beta"], "newer-run", key)
        (manager.runs_dir / "newer-run" / "config.json").touch()  # written after the older run's
        client.predict("older-run", api_name="/select_model")
        manager.runs.max_runs = 1
        assert manager.prune() == []  # the older run is in use, the newer one is the only one left to count
        assert "older-run" in service.available_models()
        client.predict("alpha", api_name="/select_model")  # the session moves on: the run may go
        assert manager.prune() == ["older-run"]
        assert service.available_models() == ["alpha", "beta", "newer-run"]


def test_public_mode_refuses_other_models_and_a_second_job_and_classify_answers_while_training(
    runs: dict[str, Path], image: Path, tmp_path: Path
) -> None:
    limits = TrainLimits.public((TINY_MODEL,), threads=1)
    assert limits.models == ("tf_efficientnet_lite0", TINY_MODEL) and limits.jobs_per_owner == 1
    with lane_app(runs, tmp_path / "studio-data", limits=limits) as (url, _, manager):
        trainer, visitor = Client(url, verbose=False), Client(url, verbose=False)
        zip_path = handle_file(photo_zip(tmp_path, per_class=8, size=64))
        with pytest.raises(AppError, match="resnet18 is not in the list of choices"):  # the menu's own check
            trainer.predict(zip_path, "resnet18", "auto", 1, 5, api_name="/train")
        data = write_digits_folder(tmp_path / "digits", per_class=4)
        with pytest.raises(ConfigError, match="'resnet18' is not offered on this server"):
            manager.submit(data, ["digit_0", "digit_1", "digit_2"], TrainOptions("resnet18"), "s:someone")
        with pytest.raises(AppError, match="16 is greater than maximum value 15"):  # the slider's range
            trainer.predict(zip_path, TINY_MODEL, "auto", 1, 16, api_name="/train")
        with pytest.raises(ConfigError, match="use up to 15 minutes"):
            options = TrainOptions(TINY_MODEL, time_budget_s=16 * 60)
            manager.submit(write_digits_folder(tmp_path / "d2", per_class=4), ["a", "b", "c"], options, "s:x")
        job = trainer.submit(zip_path, TINY_MODEL, "lp-ft", 200, 10, api_name="/train")
        deadline = time.monotonic() + TIMEOUT_S
        while not (job.outputs() and job.outputs()[-1][1]["state"] == RUNNING):
            assert time.monotonic() < deadline, job.outputs()
            time.sleep(0.1)
        run_id = job.outputs()[-1][0]
        with pytest.raises(AppError, match="already have 1 training"):
            trainer.predict(zip_path, TINY_MODEL, "auto", 1, 5, api_name="/train")
        assert labels_of(visitor.predict(handle_file(image), 2, api_name="/classify")) == set(ALPHA)
        assert manager.status(run_id).state == RUNNING  # Classify answered while the job was running
        trainer.predict(run_id, api_name="/cancel_training")
        assert job.result(timeout=TIMEOUT_S)[1]["state"] == CANCELLED


def test_public_flags_and_env_set_the_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPACE_ID", raising=False)
    args = app.get_parser().parse_args([])
    assert not app.is_public(args)
    limits, queue = app.train_limits(args)
    assert limits.models is None and limits.jobs_per_owner is None and queue == 8
    monkeypatch.setenv("SPACE_ID", "user/space")
    limits, queue = app.train_limits(app.get_parser().parse_args([]))
    assert limits.models == ("tf_efficientnet_lite0",) and limits.jobs_per_owner == 1
    assert limits.max_budget_s == 15 * 60 and limits.threads >= 1 and queue == 4
    assert not app.is_public(app.get_parser().parse_args(["--private"]))
    monkeypatch.setenv("STUDIO_TRAIN_MODELS", "resnet18, convnext_tiny")
    args = app.get_parser().parse_args(["--train-max-minutes", "60", "--train-queue", "10"])
    limits, queue = app.train_limits(args)
    assert limits.models == ("tf_efficientnet_lite0", "resnet18", "convnext_tiny")
    assert limits.max_budget_s == 3600 and queue == 10


def test_should_stop_ends_decoding_and_feature_extraction(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", per_class=30)
    samples = scan_dataset(data).train
    asked = []

    def stop_after_ten() -> bool:
        asked.append(1)
        return len(asked) > 10

    with pytest.raises(StoppedError, match="decoding"):
        build_cache(samples, lambda image: image.resize((32, 32)), 32, workers=1, should_stop=stop_after_ten)
    assert len(asked) <= len(samples) + 1  # the rest were skipped, not decoded

    manager = TrainingManager(tmp_path / "studio-data", allow_test_models=True, train_overrides=TINY_TRAIN)
    try:  # cancelled at its first decoded image: it stops there, nothing is probed or saved
        many = write_digits_folder(tmp_path / "many", per_class=150, size=64)
        run_id = manager.submit(many, ["digit_0", "digit_1", "digit_2"], TrainOptions(TINY_MODEL))
        status = manager.status(run_id)
        while status.phase != "decode":
            assert not status.is_finished, status
            status = manager.wait(run_id, status.version, timeout_s=TIMEOUT_S)
        manager.cancel(run_id)
        status = manager.wait_until_finished(run_id, timeout_s=TIMEOUT_S)
        assert status.state == CANCELLED and not status.has_model and not status.history
        assert status.phase == "decode"  # the probe never started
        assert not (manager.runs_dir / run_id).exists()
    finally:
        manager.close()

    stop = threading.Event()

    def on_event(event: TrainEvent) -> None:
        if event.kind == "step" and event.phase == "probe":
            stop.set()  # cancel arrives while the probe extracts features

    config = TrainConfig(
        data_dir=data, out=tmp_path / "run", model=TINY_MODEL, weights="none", strategy="linear", **TINY_TRAIN
    )
    with pytest.raises(StoppedError, match="extracting features"):
        fine_tune(config, on_event=on_event, should_stop=stop.is_set)
    assert not (tmp_path / "run" / "model.safetensors").exists()


@pytest.mark.browser
def test_two_browser_contexts_pick_different_models_and_each_sees_its_own_classes(
    runs: dict[str, Path], image: Path
) -> None:
    playwright_api = pytest.importorskip("playwright.sync_api")
    from test_browser import CHROMIUM, CHROMIUM_ARGS, _missing

    if not CHROMIUM.exists():
        _missing(f"chromium is not at {CHROMIUM}")
    service = InferenceService(runtime="torch")
    for name in ("alpha", "beta", "gamma"):
        service.add_run(name, load_run(runs[name]), make_default=name == "alpha")
    expect = playwright_api.expect
    expect.set_options(timeout=60_000)
    try:
        with serve(service) as url, playwright_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            pages = {}
            for model in ("beta", "gamma"):
                page = browser.new_context().new_page()
                page.goto(url)
                menu = page.locator("#model-menu input")
                menu.click()
                page.get_by_role("option", name=model).click()
                expect(menu).to_have_value(model)
                pages[model] = page
            for page in pages.values():
                page.locator("#classify-image input[type=file]").set_input_files(image)
                page.locator("#classify-button").click()
            for model, labels, others in (("beta", BETA, GAMMA), ("gamma", GAMMA, BETA)):
                label = pages[model].locator("#classify-label")
                expect(label).to_contain_text(re.compile("|".join(labels)))
                for other in (*others, *ALPHA):
                    expect(label).not_to_contain_text(other)
                expect(pages[model].locator("#classify-model-card")).to_contain_text(f"Model: {model}")
            browser.close()
    finally:
        service.close()


def test_lanes_bind_tokens_check_owners_and_drop_stale_selections() -> None:
    lanes = Lanes(session_ttl_s=0.2)
    key = lanes.bind_browser("session-1", "a" * 43)
    assert key.startswith("b:") and "a" * 43 not in key  # only a hash of the token is kept
    assert lanes.owner_key("session-1") == key and lanes.owner_key("session-2") == "s:session-2"
    with pytest.raises(ConfigError):
        lanes.bind_browser("session-3", "short")
    lanes.claim("run", key)
    assert lanes.visible(["default", "run"], key) == ["default", "run"]
    assert lanes.visible(["default", "run"], "s:session-2") == ["default"]
    lanes.share_runs = True
    assert lanes.visible(["default", "run"], "s:session-2") == ["default", "run"]
    lanes.use("session-1", "run")
    assert lanes.in_use() == {"run"}
    time.sleep(0.3)
    assert lanes.in_use() == set()  # an API client that never unloads stops pinning after the TTL
    lanes.use("session-1", "run")
    lanes.release("session-1")
    assert lanes.in_use() == set() and lanes.owner_key("session-1") == "s:session-1"
