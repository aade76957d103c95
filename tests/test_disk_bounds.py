"""Bounded disk and trusted graphs: pruning oldest-first to a size limit, the app's sweep of its uploads and
outputs, duplicate Batch files decoded once, and a Hub run's `model.onnx` never served as it came.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from app_server import launched
from conftest import TINY_MODEL, photo
from gradio_client import Client, handle_file
from huggingface_hub import constants

from demo import batch_tab, detect_tab, disk_limits, train_tab
from demo.service import InferenceService
from finetune.checkpoint import load_run, save_run
from finetune.disk import folder_bytes, prune_folder
from finetune.export import (
    META_FINGERPRINT,
    ONNX_FILE,
    export_onnx,
    load_onnx_classifier,
    weights_fingerprint,
)
from finetune.inference import Classifier
from finetune.modeling import create_model_and_transforms

KB = 1024
EXAMPLES = Path(__file__).resolve().parents[1] / "demo" / "examples"


def write_entry(folder: Path, name: str, size: int, age_s: float, is_dir: bool = False) -> Path:
    """A file (or a folder holding one file) of `size` bytes, last modified `age_s` seconds ago."""
    path = folder / name
    target = path / "data.bin" if is_dir else path
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(os.urandom(size))
    stamp = time.time() - age_s
    os.utime(target, (stamp, stamp))
    if is_dir:
        os.utime(path, (stamp, stamp))
    return path


def test_prune_folder_removes_oldest_entries_first_until_under_the_limit(tmp_path: Path) -> None:
    ages = {"a": 500, "b": 400, "c": 300, "d": 200, "e": 100}  # a is the oldest
    for index, (name, age) in enumerate(ages.items()):
        write_entry(tmp_path, name, 100 * KB, age, is_dir=index % 2 == 0)
    report = prune_folder(tmp_path, max_bytes=250 * KB)
    assert sorted(path.name for path in report.removed) == ["a", "b", "c"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d", "e"]
    assert folder_bytes(tmp_path) == report.bytes_after == 200 * KB <= 250 * KB
    assert report.bytes_before == 500 * KB


def test_prune_folder_keeps_recent_and_protected_entries_and_drops_expired_ones(tmp_path: Path) -> None:
    old = write_entry(tmp_path, "old", 10 * KB, 5000)
    example = write_entry(tmp_path, "example", 10 * KB, 4000, is_dir=True)
    write_entry(tmp_path, "recent", 500 * KB, 10)
    report = prune_folder(tmp_path, max_bytes=1, keep_newer_than_s=60, protected=[example])
    assert report.removed == [old]  # over the limit, yet the recent and the protected entries stay
    assert sorted(path.name for path in tmp_path.iterdir()) == ["example", "recent"]
    write_entry(tmp_path, "stale", 1, 7200)
    assert [path.name for path in prune_folder(tmp_path, max_age_s=3600).removed] == ["stale", "example"]
    assert prune_folder(tmp_path / "missing", max_bytes=1).removed == []


def test_prune_folder_can_keep_a_number_of_newest_entries(tmp_path: Path) -> None:
    for age in range(6):
        write_entry(tmp_path, f"f{age}", 1, age * 10)
    prune_folder(tmp_path, max_entries=2)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["f0", "f1"]


def test_onnx_export_cache_is_pruned_to_its_limit_keeping_the_new_export(
    untrained_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(cache))
    monkeypatch.setenv("STUDIO_ONNX_CACHE_GB", str(3 * 1024 / 1024**3))  # 3 MB
    for n, age in enumerate((3000, 2000, 1000)):  # three older exports of other runs, 1 MB each
        write_entry(cache / "onnx", f"other-{n}", 1024 * KB, age, is_dir=True)
    run = load_run(untrained_run_dir)
    run.run_dir = None  # a folder-less run exports into the cache
    classifier = load_onnx_classifier(run)
    assert classifier.onnx_path.is_relative_to(cache / "onnx") and classifier.onnx_path.is_file()
    left = sorted(path.name for path in (cache / "onnx").iterdir())
    assert "other-0" not in left and classifier.onnx_path.parent.name in left  # oldest went first
    assert folder_bytes(cache / "onnx") <= 3 * 1024 * KB


def make_hub_snapshot(cache: Path, repo_id: str, files: Path) -> Path:
    """huggingface_hub's layout for a downloaded repo: refs/main -> snapshots/<commit>/files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    return Path(
        shutil.copytree(files, storage / "snapshots" / commit, ignore=shutil.ignore_patterns("*.onnx"))
    )


def test_a_tampered_hub_model_onnx_is_not_served(
    untrained_run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Hub run whose model.onnx is another model's graph, stamped with this run's fingerprint (a metadata
    string anyone can copy), is exported again from the run's own weights; the file is never loaded."""
    import onnx

    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub_cache"))
    snapshot = make_hub_snapshot(tmp_path / "hub_cache", "mallory/tiny", untrained_run_dir)
    run = load_run("hf-hub:mallory/tiny")
    assert run.run_dir == snapshot

    # Other weights, same architecture and classes: a head biased hard towards "cat", so its answers differ
    # from the run's by far more than any tolerance (two random inits both answer near 1/3 each).
    other = create_model_and_transforms(TINY_MODEL, num_classes=3, weights="none", img_size=64)
    with torch.no_grad():
        other.model.get_classifier().bias.copy_(torch.tensor([4.0, 0.0, -4.0]))
    other_dir = tmp_path / "other"
    save_run(other_dir, other.model, run.labels, other.data_config, {"weights_source": "none"})
    other_run = load_run(other_dir)
    images = [photo(name) for name in ("chelsea", "coffee", "rocket")]
    export_onnx(other_run, other_dir / ONNX_FILE, images)
    tampered = onnx.load(str(other_dir / ONNX_FILE))
    for prop in tampered.metadata_props:
        if prop.key == META_FINGERPRINT:
            prop.value = weights_fingerprint(run)
    onnx.save(tampered, str(snapshot / ONNX_FILE))

    served = load_onnx_classifier(run)
    assert served.onnx_path.is_relative_to(tmp_path / "cache") and served.onnx_path != snapshot / ONNX_FILE
    expected = Classifier(run).predict_probs(images)
    np.testing.assert_allclose(served.predict_probs(images), expected, atol=1e-3)
    graph_from_the_hub = Classifier(other_run).predict_probs(images)
    assert np.abs(graph_from_the_hub - expected).max() > 0.3  # the tampered graph would have answered so
    service = InferenceService.from_checkpoint("hf-hub:mallory/tiny", runtime="onnx")
    try:
        assert service.info().runtime == "onnx"
        probs = service.predict_topk(photo("chelsea"), 3).probs
        assert np.allclose(sorted(probs, reverse=True), np.sort(expected[0])[::-1], atol=1e-3)
    finally:
        service.close()


class CountingService(InferenceService):
    """The real service, counting the images it decodes (every decode goes through `_open`)."""

    opened = 0

    def _open(self, *args: Any, **kwargs: Any) -> Any:
        type(self).opened += 1
        return super()._open(*args, **kwargs)


@pytest.fixture(scope="module")
def served(untrained_run_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    """The real app on 127.0.0.1 with its upload cache in a folder of its own; yields (url, demo)."""
    uploads = tmp_path_factory.mktemp("gradio_uploads")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GRADIO_TEMP_DIR", str(uploads))  # read by Gradio at every upload check, so kept set
        service = CountingService.from_checkpoint(untrained_run_dir, runtime="torch")
        try:
            with launched(service) as demo:
                yield demo.local_url, demo
        finally:
            service.close()


def test_batch_decodes_a_file_listed_sixteen_times_once(served: tuple[str, Any], tmp_path: Path) -> None:
    url, _ = served
    big = tmp_path / "big.png"
    photo("chelsea").resize((1800, 1200)).save(big)
    copy = tmp_path / "copy-of-big.png"
    shutil.copy(big, copy)
    client = Client(url, verbose=False)
    before = CountingService.opened
    table, _ = client.predict([handle_file(big)] * 16 + [handle_file(copy)], api_name="/batch")
    assert CountingService.opened - before == 1
    rows = table["data"]
    assert [row[0] for row in rows] == ["big.png"] * 16 + ["copy-of-big.png"]
    assert len({tuple(row[1:]) for row in rows}) == 1  # the same answer for every copy


def test_sweep_bounds_uploads_outputs_and_the_hub_cache_oldest_first(
    served: tuple[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, demo = served
    cache = Path(demo.GRADIO_CACHE)
    examples = disk_limits._example_entries(demo)
    assert examples and all(entry.parent == cache for entry in examples)  # the Classify tab's example photos
    uploaded = []
    for n in range(4):
        response = httpx.post(
            f"{url}gradio_api/upload", files={"files": (f"{n}.bin", os.urandom(300 * KB))}, timeout=30
        )
        uploaded.append(cache / Path(response.json()[0]).relative_to(cache).parts[0])
    for age, entry in zip((4000, 3000, 2000, 1000), uploaded, strict=True):
        stamp = time.time() - age
        for path in (*entry.rglob("*"), entry):
            os.utime(path, (stamp, stamp))
    outputs = {folder: tmp_path / folder.name for folder in disk_limits.output_folders()}
    monkeypatch.setattr(batch_tab, "OUTPUT_ROOT", outputs[batch_tab.OUTPUT_ROOT])
    monkeypatch.setattr(detect_tab, "DOWNLOAD_DIR", outputs[detect_tab.DOWNLOAD_DIR])
    monkeypatch.setattr(train_tab, "DOWNLOAD_ROOT", outputs[train_tab.DOWNLOAD_ROOT])
    for folder in outputs.values():
        for age in (3000, 2000, 1000):
            write_entry(folder, f"out-{age}", 200 * KB, age, is_dir=True)

    hub = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub))
    repos = [write_entry(hub, f"models--u--{age}", 200 * KB, age, is_dir=True) for age in (3000, 2000, 1000)]
    locks = write_entry(hub, ".locks", 10 * KB, 9000, is_dir=True)

    others = folder_bytes(cache) - sum(folder_bytes(entry) for entry in uploaded)
    monkeypatch.setenv("STUDIO_UPLOAD_CACHE_GB", str((others + 700 * KB) / 1024**3))
    monkeypatch.setenv("STUDIO_OUTPUTS_GB", str(500 * KB / 1024**3))
    monkeypatch.delenv("SPACE_ID", raising=False)
    disk_limits.sweep(demo)
    assert all(repo.exists() for repo in repos)  # a workstation's Hub cache is not ours unless told
    monkeypatch.setenv("STUDIO_HUB_CACHE_GB", str(500 * KB / 1024**3))
    disk_limits.sweep(demo)
    assert [repo.exists() for repo in repos] == [False, True, True] and locks.exists()

    assert [entry.exists() for entry in uploaded] == [False, False, True, True]  # oldest first
    assert all(entry.exists() for entry in examples)
    assert folder_bytes(cache) <= others + 700 * KB
    for folder in outputs.values():
        assert sorted(path.name for path in folder.iterdir()) == ["out-1000", "out-2000"]
    result = Client(url, verbose=False).predict(handle_file(EXAMPLES / "coffee.jpg"), 2, api_name="/classify")
    assert len(result["confidences"]) == 2  # the server still serves after the sweep
