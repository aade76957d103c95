"""Tests for demo/vision_tasks.py and demo/vision_weights.py, offline.

Both pipelines run end to end with randomly initialised torchvision models of the real architectures
(`weights=None, weights_backbone=None`), saved to disk and given to the service as local weight files, which
is the code path a user with downloaded weights takes. The only fake is the network boundary
(`torch.hub.download_url_to_file`), used to check that the download path is torchvision's own `weights=`
download and gives the very model torchvision builds.
"""

from __future__ import annotations

import json
import logging
import shutil
import urllib.error
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import photo
from PIL import Image
from safetensors.torch import save_file
from vision_models import SIZE, random_state_dict, write_random_weights

from demo.vision_tasks import (
    MODEL_MAX_SIDE,
    Detection,
    SegmentationResult,
    VisionService,
    class_color,
    class_shares,
    make_detection_result,
)
from demo.vision_weights import (
    DEFAULT_MODEL,
    SPECS,
    TASKS,
    VisionConfig,
)
from finetune.errors import CheckpointError, ConfigError, ImageError, WeightsUnavailableError


@pytest.fixture(scope="module")
def weight_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_random_weights(tmp_path_factory.mktemp("vision_weights"))


@pytest.fixture(scope="module")
def service(weight_files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> VisionService:
    config = VisionConfig(
        detector_weights=weight_files["detector"],
        segmenter_weights=weight_files["segmenter"],
        allow_download=False,
        hub_dir=tmp_path_factory.mktemp("empty_hub"),
        min_score=0.0,
    )
    return VisionService(config)


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    return photo("astronaut").resize(SIZE)


def loaded_tensors_equal(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    return all(torch.equal(own[key], value) for key, value in state_dict.items() if key in own)


def test_detect_end_to_end_draws_boxes_inside_an_image_of_the_input_size(service, astronaut):
    result = service.detect(astronaut, threshold=0.0)

    assert result.image.size == astronaut.size and result.image.mode == "RGB"
    assert result.detections, "the random-init detector with a 0 threshold should return boxes"
    width, height = astronaut.size
    for detection in result.detections:
        x0, y0, x1, y1 = detection.box
        assert 0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height
    assert [d.score for d in result.detections] == sorted((d.score for d in result.detections), reverse=True)
    names = {name for name in SPECS["detector"][DEFAULT_MODEL["detector"]].categories}
    assert {d.label for d in result.detections} <= names
    assert not np.array_equal(np.asarray(result.image), np.asarray(astronaut)), "boxes were not drawn"
    assert result.weights_source == f"file:{service.config.detector_weights}"
    data = json.loads(json.dumps(result.as_dict()))
    assert data["image_size"] == list(SIZE) and len(data["detections"]) == len(result.detections)


def test_detect_threshold_keeps_exactly_the_boxes_at_or_above_it(service, astronaut):
    everything = service.detect(astronaut, threshold=0.0)
    levels = sorted({d.score for d in everything.detections})
    assert len(levels) >= 2, "need boxes with different scores"
    threshold = levels[len(levels) // 2]

    moved = everything.with_threshold(threshold)
    assert moved.detections == [d for d in everything.detections if d.score >= threshold]
    assert 0 < len(moved.detections) < len(everything.detections)
    rerun = service.detect(astronaut, threshold)
    assert [(d.label, d.score) for d in rerun.detections] == [(d.label, d.score) for d in moved.detections]

    none = everything.with_threshold(1.0)
    assert none.detections == [] and np.array_equal(np.asarray(none.image), np.asarray(astronaut))
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ConfigError, match="threshold"):
            service.detect(astronaut, bad)


def test_detection_threshold_filters_each_box_by_its_own_score(astronaut):
    boxes = [Detection("cat", 0.9, (10, 10, 50, 60), 17), Detection("dog", 0.4, (60, 20, 120, 90), 18)]
    result = make_detection_result(astronaut, boxes, 0.5, "model", "file:x")

    assert [d.label for d in result.detections] == ["cat"]
    pixels, original = np.asarray(result.image), np.asarray(astronaut)
    assert not np.array_equal(pixels[10:61, 10:51], original[10:61, 10:51])  # the cat's box is drawn
    assert np.array_equal(pixels[40:80, 80:110], original[40:80, 80:110])  # inside the dropped dog box
    assert [d.label for d in result.with_threshold(0.3).detections] == ["cat", "dog"]


def test_detect_scales_boxes_back_to_large_images(service, astronaut):
    wide = photo("astronaut").resize((1600, 400))
    small = wide.copy()
    small.thumbnail((MODEL_MAX_SIDE, MODEL_MAX_SIDE))

    big_result, small_result = service.detect(wide, 0.0), service.detect(small, 0.0)

    assert big_result.image.size == (1600, 400)
    scale = np.array([1600 / small.width, 400 / small.height] * 2)
    big_boxes = np.array([d.box for d in big_result.detections])
    small_boxes = np.array([d.box for d in small_result.detections]) * scale
    assert big_boxes.shape == small_boxes.shape and np.allclose(big_boxes, small_boxes, atol=0.5)
    assert (big_boxes[:, [0, 2]] <= 1600).all() and (big_boxes[:, [1, 3]] <= 400).all()


def test_segment_end_to_end_mask_overlay_and_legend(service, astronaut):
    result = service.segment(astronaut)

    assert result.mask.shape == (SIZE[1], SIZE[0]) and result.image.size == SIZE
    ids, counts = np.unique(result.mask, return_counts=True)
    assert {share.class_id for share in result.legend} == set(ids.tolist())
    assert sum(share.share for share in result.legend) == pytest.approx(1.0)
    for share in result.legend:
        assert share.share == pytest.approx(counts[ids == share.class_id][0] / result.mask.size)
        assert share.color == class_color(share.class_id)
    assert np.array_equal(np.asarray(result.overlay(0.0)), np.asarray(astronaut))
    full = np.asarray(result.overlay(1.0))
    painted = result.mask != 0
    palette = np.array([class_color(i) for i in range(256)], dtype=np.uint8)
    assert np.array_equal(full[painted], palette[result.mask[painted]])
    assert np.array_equal(full[~painted], np.asarray(astronaut)[~painted])
    assert result.overlay(0.5).size == SIZE
    with pytest.raises(ConfigError, match="opacity"):
        result.overlay(1.5)


def test_legend_and_overlay_of_a_mask_with_several_classes(astronaut):
    mask = np.zeros((SIZE[1], SIZE[0]), dtype=np.uint8)
    mask[:, :112] = 15  # person: half the pixels
    mask[:40, 112:] = 12  # dog: a quarter of the other half
    categories = SPECS["segmenter"][DEFAULT_MODEL["segmenter"]].categories
    result = SegmentationResult(astronaut, mask, class_shares(mask, categories), "model", "file:x")

    assert [(s.label, round(s.share, 4)) for s in result.legend] == [
        ("person", 0.5),
        ("background", 0.375),
        ("dog", 0.125),
    ]
    half = np.asarray(result.overlay(0.5)).astype(int)
    expected = (np.asarray(astronaut).astype(int)[0, 0] + np.array(class_color(15))) / 2
    assert np.abs(half[0, 0] - expected).max() <= 1
    assert np.array_equal(half[100, 200], np.asarray(astronaut)[100, 200])  # background stays as it was


@pytest.mark.parametrize(
    "content",
    [b"this is not an image", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b""],
    ids=["text", "truncated", "empty"],
)
def test_bad_images_raise_an_image_error(service, tmp_path, content):
    path = tmp_path / "upload.png"
    path.write_bytes(content)
    with pytest.raises(ImageError):
        service.detect(path, 0.5)
    with pytest.raises(ImageError):
        service.segment(path)


def test_no_weights_offline_says_which_file_to_place_where(tmp_path, astronaut):
    config = VisionConfig(weights_dir=tmp_path / "weights", hub_dir=tmp_path / "hub", allow_download=False)
    service = VisionService(config)

    for task, run in (
        ("detector", lambda: service.detect(astronaut)),
        ("segmenter", lambda: service.segment(astronaut)),
    ):
        status = service.weights_status(task)
        assert not status.is_available
        for needed in (
            SPECS[task][DEFAULT_MODEL[task]].file_name,
            str(tmp_path / "weights"),
            str(tmp_path / "hub" / "checkpoints"),
            f"--{task}-weights",
            "--no-vision",
            "VISION_TABS=off",
        ):
            assert needed in status.message
        with pytest.raises(WeightsUnavailableError) as raised:
            run()
        assert str(raised.value) == status.message


def test_an_explicit_weights_file_that_is_missing_is_reported_not_skipped(tmp_path):
    hub = tmp_path / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(
        random_state_dict("segmenter", seed=0), hub / SPECS["segmenter"][DEFAULT_MODEL["segmenter"]].file_name
    )
    service = VisionService(VisionConfig(segmenter_weights=tmp_path / "typo.pth", hub_dir=tmp_path / "hub"))

    status = service.weights_status("segmenter")
    assert (
        status.source == "missing"
        and "typo.pth" in status.message
        and "--segmenter-weights" in status.message
    )
    with pytest.raises(WeightsUnavailableError, match="typo.pth"):
        service.segment(photo("coffee").resize(SIZE))


def test_a_local_weights_file_is_picked_up_and_used(tmp_path, astronaut):
    saved = random_state_dict("segmenter", seed=7)
    path = tmp_path / "my_lraspp.pth"
    torch.save(saved, path)  # the official format: a plain state dict, read back with weights_only=True
    service = VisionService(VisionConfig(segmenter_weights=path, allow_download=False, hub_dir=tmp_path))

    assert service.weights_status("segmenter").source == "file"
    result = service.segment(astronaut)
    assert loaded_tensors_equal(service.model("segmenter"), saved)
    assert result.weights_source == f"file:{path}"
    spec = SPECS["segmenter"][DEFAULT_MODEL["segmenter"]]
    reference = spec.build().eval()
    reference.load_state_dict(saved)
    with torch.inference_mode():
        logits = reference(spec.weights.transforms()(astronaut).unsqueeze(0))["out"][0]
    classes = Image.fromarray(logits.argmax(0).to(torch.uint8).numpy()).resize(SIZE, Image.Resampling.NEAREST)
    assert np.array_equal(result.mask, np.asarray(classes))


def test_weights_folder_then_hub_cache_are_searched_by_official_file_name(tmp_path):
    spec = SPECS["segmenter"][DEFAULT_MODEL["segmenter"]]
    in_folder, in_cache = random_state_dict("segmenter", seed=1), random_state_dict("segmenter", seed=2)
    (tmp_path / "weights").mkdir()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(in_folder, tmp_path / "weights" / spec.file_name)
    torch.save(in_cache, tmp_path / "hub" / "checkpoints" / spec.file_name)

    both = VisionService(VisionConfig(weights_dir=tmp_path / "weights", hub_dir=tmp_path / "hub"))
    assert both.weights_status("segmenter").source == "file"
    assert loaded_tensors_equal(both.model("segmenter"), in_folder)
    cache_only = VisionService(VisionConfig(weights_dir=tmp_path / "nothing", hub_dir=tmp_path / "hub"))
    assert cache_only.weights_status("segmenter").source == "cache"
    assert loaded_tensors_equal(cache_only.model("segmenter"), in_cache)

    (tmp_path / "weights" / spec.file_name).unlink()
    save_file(in_folder, str(tmp_path / "weights" / f"{Path(spec.file_name).stem}.safetensors"))
    safetensors = VisionService(VisionConfig(weights_dir=tmp_path / "weights", hub_dir=tmp_path / "hub"))
    assert loaded_tensors_equal(safetensors.model("segmenter"), in_folder)


def fake_download(source: Path, calls: list[str]):
    """Stands in for the network: 'downloads' a local file to where torch hub asked (no hash check)."""

    def download(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        calls.append(url)
        shutil.copy(source, dst)

    return download


ALL_MODELS = [(task, DEFAULT_MODEL[task]) for task in TASKS] + [
    pytest.param(task, name, marks=pytest.mark.slow)
    for task, specs in SPECS.items()
    for name in specs
    if name != DEFAULT_MODEL[task]
]


@pytest.mark.parametrize(("task", "name"), ALL_MODELS)
def test_download_is_torchvision_weights_download_and_gives_its_exact_model(
    task, name, tmp_path, monkeypatch, astronaut
):
    spec = SPECS[task][name]
    source = tmp_path / "served.pth"
    torch.save(random_state_dict(task, seed=3, name=name), source)
    calls: list[str] = []
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download(source, calls))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    service = VisionService(VisionConfig(allow_download=True, **{task: name}))

    assert service.weights_status(task).source == "download"
    ours = service.model(task)
    assert calls == [spec.weights.url]
    assert (tmp_path / "torch" / "hub" / "checkpoints" / spec.file_name).is_file()
    official = spec.builder(weights=spec.weights).eval()  # torchvision's weights= path, now from the cache
    owner = getattr(official, "roi_heads", official)
    if hasattr(owner, "score_thresh"):  # SSD's own floor is 0.001; compare at the service's floor
        owner.score_thresh = service.min_score
    assert calls == [spec.weights.url], "the cached file should have been reused"
    assert (
        VisionService(VisionConfig(allow_download=False, **{task: name})).weights_status(task).source
        == "cache"
    )

    with torch.inference_mode():
        image = spec.weights.transforms()(astronaut)
        if task == "detector":
            mine, theirs = ours([image])[0], official([image])[0]
            assert len(theirs["boxes"]) > 0
            for key in ("boxes", "labels", "scores"):
                assert torch.allclose(mine[key].float(), theirs[key].float(), atol=1e-4)
        else:
            assert torch.allclose(ours(image[None])["out"], official(image[None])["out"], atol=1e-5)


def test_failed_download_becomes_weights_unavailable_and_is_retried(tmp_path, monkeypatch):
    def offline(url: str, dst: str, hash_prefix: str | None = None, progress: bool = True) -> None:
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    service = VisionService(VisionConfig(allow_download=True, hub_dir=tmp_path / "hub"))
    spec = SPECS["segmenter"][DEFAULT_MODEL["segmenter"]]
    with pytest.raises(WeightsUnavailableError, match="URLError") as raised:
        service.segment(photo("coffee").resize(SIZE))
    assert spec.file_name in str(raised.value) and "VISION_TABS=off" in str(raised.value)

    torch.save(random_state_dict("segmenter", seed=0), tmp_path / "hub" / "checkpoints" / spec.file_name)
    assert service.segment(photo("coffee").resize(SIZE)).weights_source.startswith("cache:")


def test_models_load_once_under_concurrent_first_use(weight_files, astronaut, caplog):
    service = VisionService(VisionConfig(segmenter_weights=weight_files["segmenter"], allow_download=False))
    caplog.set_level(logging.INFO, logger="demo.vision_weights")

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda _: service.segment(astronaut), range(4)))

    assert len([r for r in caplog.records if r.getMessage().startswith("Loaded ")]) == 1
    assert all(np.array_equal(result.mask, results[0].mask) for result in results)


def test_weights_for_another_architecture_are_refused(weight_files, astronaut):
    service = VisionService(VisionConfig(detector_weights=weight_files["segmenter"], allow_download=False))
    with pytest.raises(CheckpointError, match="does not fit"):
        service.detect(astronaut)


def test_config_comes_from_env_vars_with_flags_on_top():
    assert VisionConfig.from_env({}) == VisionConfig()
    assert not VisionConfig.from_env({"VISION_TABS": "off"}).is_enabled
    assert VisionConfig.from_env({"VISION_TABS": "off"}, is_enabled=True).is_enabled
    assert not VisionConfig.from_env({"HF_HUB_OFFLINE": "1"}).allow_download
    assert not VisionConfig.from_env({"VISION_DOWNLOAD": "off"}).allow_download
    config = VisionConfig.from_env(
        {"VISION_WEIGHTS_DIR": "/data/w", "VISION_DETECTOR": "ssdlite320_mobilenet_v3_large"},
        segmenter_weights="/data/seg.pth",
        weights_dir=None,
    )
    assert config.weights_dir == Path("/data/w") and config.detector == "ssdlite320_mobilenet_v3_large"
    assert config.segmenter_weights == Path("/data/seg.pth")
    with pytest.raises(ConfigError, match="lraspp_mobilenet_v3_large"):
        VisionConfig(segmenter="unet")
    with pytest.raises(ConfigError, match="min_score"):
        VisionConfig(min_score=2.0)


def test_turned_off_service_refuses_to_load(weight_files, astronaut):
    service = VisionService(VisionConfig(is_enabled=False, detector_weights=weight_files["detector"]))
    with pytest.raises(ConfigError, match="--no-vision"):
        service.detect(astronaut)


def test_categories_and_file_names_come_from_torchvision_metadata():
    for task, specs in SPECS.items():
        for spec in specs.values():
            assert spec.weights.url.endswith("/" + spec.file_name) and spec.file_name.endswith(".pth")
            assert spec.categories[0] == "__background__"
            assert ("person" in spec.categories) and len(spec.categories) == (
                91 if task == "detector" else 21
            )
