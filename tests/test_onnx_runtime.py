"""The ONNX Runtime path of `create_classifier`: same answers as PyTorch, cached exports, clear fallbacks.

Fast tests use the tiny random-init run; the `slow` ones export the real embedded ImageNet model, whose
top-1 on real photos means something.
"""

from __future__ import annotations

import logging
import shutil
import sys
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import needs_int8_dot_product, photo, write_digits_folder
from PIL import Image

from finetune.checkpoint import load_default_run, load_run
from finetune.errors import ConfigError, RuntimeUnavailableError
from finetune.export import ONNX_FILE, main, weights_fingerprint
from finetune.file_predict import classify_files
from finetune.images import open_image
from finetune.inference import Classifier, OnnxClassifier, parse_tta
from finetune.runtime import create_classifier

PHOTOS = ("chelsea", "coffee", "astronaut", "rocket")


# other tests serve the shared tiny run with runtime "auto", which exports model.onnx into it
NO_ONNX = shutil.ignore_patterns("model.onnx")


@pytest.fixture
def run_dir(tmp_path: Path, untrained_run_dir: Path) -> Path:
    return Path(shutil.copytree(untrained_run_dir, tmp_path / "run", ignore=NO_ONNX))


@pytest.fixture(scope="module")
def exported_run_dir(tmp_path_factory: pytest.TempPathFactory, untrained_run_dir: Path) -> Path:
    """The tiny run with its model.onnx, exported once for the tests that only read it."""
    run_dir = Path(
        shutil.copytree(untrained_run_dir, tmp_path_factory.mktemp("exported") / "run", ignore=NO_ONNX)
    )
    assert main([str(run_dir), "--quiet"]) == 0
    return run_dir


def digit_images(root: Path) -> list[Image.Image]:
    return [open_image(path) for path in sorted(write_digits_folder(root).rglob("*.png"))]


def test_onnx_and_torch_agree_on_photos_and_digits(exported_run_dir: Path, tmp_path: Path) -> None:
    run = load_run(exported_run_dir)
    onnx = create_classifier(run, "onnx")
    assert isinstance(onnx, OnnxClassifier) and onnx.onnx_path == exported_run_dir / ONNX_FILE
    torch_classifier = create_classifier(run, "torch")
    assert type(torch_classifier) is Classifier
    for images in ([photo(name) for name in PHOTOS], digit_images(tmp_path)):
        expected, actual = torch_classifier.predict_probs(images), onnx.predict_probs(images)
        np.testing.assert_allclose(actual, expected, atol=1e-5)
        labels = [p.label for p in torch_classifier.predict(images)]
        assert [p.label for p in onnx.predict(images, k=2)] == labels


def test_auto_exports_once_then_reuses_the_export(run_dir: Path) -> None:
    first = create_classifier(load_run(run_dir), "auto")
    assert first.runtime == "onnx" and first.onnx_path == run_dir / ONNX_FILE
    written = (run_dir / ONNX_FILE).stat().st_mtime_ns
    second = create_classifier(load_run(run_dir), "auto")
    assert second.runtime == "onnx"
    assert (run_dir / ONNX_FILE).stat().st_mtime_ns == written  # found, not exported again


def test_auto_replaces_an_export_of_other_weights(exported_run_dir: Path, run_dir: Path) -> None:
    shutil.copy(exported_run_dir / ONNX_FILE, run_dir / ONNX_FILE)
    run = load_run(run_dir)
    with torch.no_grad():
        run.model.get_classifier().bias.add_(torch.tensor([3.0, 0.0, -3.0]))  # as if trained further
    classifier = create_classifier(run, "auto")
    assert classifier.runtime == "onnx"
    assert classifier.metadata["studio.fingerprint"] == weights_fingerprint(run)
    images = [photo(name) for name in PHOTOS]
    expected = Classifier(run).predict_probs(images)
    np.testing.assert_allclose(classifier.predict_probs(images), expected, atol=1e-5)


def test_auto_replaces_a_corrupt_export(run_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    (run_dir / ONNX_FILE).write_bytes(b"this is not a protobuf")
    with caplog.at_level(logging.WARNING):
        classifier = create_classifier(load_run(run_dir), "auto")
    assert classifier.runtime == "onnx"
    assert "not a usable ONNX model" in caplog.text


def test_folderless_runs_export_into_the_cache(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(tmp_path / "cache"))
    run = replace(load_run(run_dir), run_dir=None)  # like the embedded default model
    classifier = create_classifier(run, "auto")
    assert classifier.runtime == "onnx"
    assert classifier.onnx_path.is_relative_to(tmp_path / "cache")
    assert not (run_dir / ONNX_FILE).exists()


def test_auto_falls_back_to_torch_with_a_warning_when_export_fails(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be created below a file")
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(blocker))
    run = replace(load_run(run_dir), run_dir=None)
    with caplog.at_level(logging.WARNING):
        classifier = create_classifier(run, "auto")
    assert classifier.runtime == "torch"
    assert "using PyTorch instead" in caplog.text and "STUDIO_CACHE_DIR" in caplog.text
    with pytest.raises(RuntimeUnavailableError, match="cannot write the ONNX export"):
        create_classifier(run, "onnx")  # asked for explicitly: an error that says what to do, no fallback


def test_onnx_runtime_without_onnxruntime_is_a_clear_error(
    exported_run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = load_run(exported_run_dir)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when not installed
    with pytest.raises(RuntimeUnavailableError, match="pip install onnxruntime"):
        create_classifier(run, "onnx")
    assert create_classifier(run, "auto").runtime == "torch"


def test_unknown_runtime_is_a_config_error(exported_run_dir: Path) -> None:
    with pytest.raises(ConfigError, match="choose one of auto, onnx, onnx-int8, torch"):
        create_classifier(load_run(exported_run_dir), "tensorrt")


def test_fast_preprocessing_equals_the_run_transform(untrained_run_dir: Path) -> None:
    run = load_run(untrained_run_dir)
    rgba = photo("coffee").convert("RGBA")
    images = [photo("chelsea"), photo("camera").convert("L"), rgba]  # RGB, grayscale, RGBA (on white)
    expected = torch.stack([run.transform(open_image(image)) for image in images])
    np.testing.assert_allclose(Classifier(run).preprocess(images).numpy(), expected.numpy(), atol=1e-6)


def test_draft_decoding_matches_full_decoding(untrained_run_dir: Path, tmp_path: Path) -> None:
    run = load_run(untrained_run_dir)
    classifier = Classifier(run)
    path = tmp_path / "large.jpg"
    photo("astronaut").resize((4000, 3000), Image.LANCZOS).save(path, quality=90)
    drafted, full = classifier.open(path), open_image(path)
    assert full.size == (4000, 3000) and max(drafted.size) < 4000  # decoded at reduced size
    assert min(drafted.size) >= classifier.draft_size[0]  # but never below what the resize needs
    std = torch.tensor(run.data_config["std"]).reshape(1, 3, 1, 1)
    gray_levels = (classifier.preprocess([drafted]) - classifier.preprocess([full])).abs() * std * 255
    assert gray_levels.mean() < 1.0  # less than one 8-bit gray level on average


def test_tta_averages_the_probabilities_of_zoomed_views(untrained_run_dir: Path) -> None:
    classifier = Classifier(load_run(untrained_run_dir))
    images = [photo(name) for name in PHOTOS]
    plain = classifier.predict_probs(images)
    np.testing.assert_allclose(classifier.predict_probs(images, tta=(1.0,)), plain, atol=1e-7)
    views = [classifier.predict_logits(classifier.preprocess(images, zoom)) for zoom in (1.0, 1.3)]
    expected = np.mean([np.exp(v) / np.exp(v).sum(axis=1, keepdims=True) for v in views], axis=0)
    fused = classifier.predict_probs(images, tta=(1.0, 1.3))
    np.testing.assert_allclose(fused, expected, atol=1e-6)
    assert not np.allclose(fused, plain, atol=1e-7)  # the zoomed view really is another view


def test_parse_tta_reads_scales_and_rejects_nonsense() -> None:
    assert parse_tta(None) is None and parse_tta("") is None
    assert parse_tta("default") == (1.0, 0.875, 1.15)
    assert parse_tta("1,1.2") == (1.0, 1.2)
    for bad in ("big", "0", "1,,2", "10"):
        with pytest.raises(ConfigError, match="invalid --tta"):
            parse_tta(bad)


def test_classify_files_chunks_a_folder_and_reports_bad_files(
    exported_run_dir: Path, photo_dir: Path, tmp_path: Path
) -> None:
    classifier = create_classifier(load_run(exported_run_dir), "onnx", batch_size=3)
    bad = tmp_path / "not-an-image.jpg"
    bad.write_bytes(b"plain text")
    paths = [*sorted(photo_dir.glob("*.jpg")), bad]
    chunks = list(classify_files(classifier, paths))
    assert [len(chunk) for chunk in chunks] == [3, 2]  # chunks of the classifier's batch size
    rows = [outcome for chunk in chunks for outcome in chunk]
    assert [row.item for row in rows] == paths
    assert rows[-1].probs is None and "not an image" in rows[-1].error
    expected = classifier.predict_probs([classifier.open(path) for path in paths[:-1]])
    assert np.allclose(np.stack([row.probs for row in rows[:-1]]), expected, atol=1e-6)


def test_onnx_classifier_answers_concurrent_requests_like_sequential_ones(exported_run_dir: Path) -> None:
    classifier = create_classifier(load_run(exported_run_dir), "onnx")
    images = [photo(name) for name in PHOTOS] * 2
    expected = [classifier.predict_probs([image]) for image in images]
    results: dict[int, np.ndarray] = {}

    def request(index: int) -> None:
        for _ in range(5):
            results[index] = classifier.predict_probs([images[index]])

    threads = [threading.Thread(target=request, args=(index,)) for index in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for index, probs in enumerate(expected):
        np.testing.assert_array_equal(results[index], probs)


@pytest.fixture(scope="module")
def default_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An export cache holding the embedded ImageNet model's FP32 export, made by the CLI."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STUDIO_CACHE_DIR", str(cache))
        assert main(["default", "--onnx", "--quiet"]) == 0
    return cache


@pytest.fixture(scope="module")
def default_classifiers(default_cache: Path) -> tuple[Classifier, Classifier]:
    """The embedded ImageNet model in PyTorch and in ONNX Runtime (FP32, from the CLI's export)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("STUDIO_CACHE_DIR", str(default_cache))
        run = load_default_run()
        onnx = create_classifier(run, "onnx")  # must find the CLI's export, not make another
    assert onnx.onnx_path.is_relative_to(default_cache)
    return Classifier(run), onnx


@pytest.mark.slow
def test_default_model_gives_the_same_top1_on_both_runtimes(
    default_classifiers: tuple[Classifier, Classifier], tmp_path: Path
) -> None:
    torch_classifier, onnx = default_classifiers
    photos = [photo(name) for name in PHOTOS]
    assert torch_classifier.predict(photos, k=1)[1].label == "espresso"  # the real weights are in use
    for images in (photos, digit_images(tmp_path)):
        expected, actual = torch_classifier.predict_probs(images), onnx.predict_probs(images)
        assert np.abs(actual - expected).max() < 1e-4
        assert (actual.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.slow
@needs_int8_dot_product
def test_default_model_in_int8_keeps_the_answer_on_real_photos(
    default_classifiers: tuple[Classifier, Classifier], default_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch_classifier, _ = default_classifiers
    monkeypatch.setenv("STUDIO_CACHE_DIR", str(default_cache))
    assert main(["default", "--int8", "--quiet"]) == 0  # quantizes the FP32 export in the cache
    int8 = create_classifier(load_default_run(), "onnx-int8")  # must find the CLI's INT8 file
    assert int8.runtime == "onnx-int8" and int8.onnx_path.is_relative_to(default_cache)
    # INT8 is not exact, but keeps the answer on each real photo (ImageNet digits are not its job)
    photos = [photo(name) for name in PHOTOS]
    expected, quantized = torch_classifier.predict_probs(photos), int8.predict_probs(photos)
    assert (quantized.argmax(axis=1) == expected.argmax(axis=1)).all()
    assert 0 < np.abs(quantized - expected).max() < 0.2


@pytest.mark.slow
def test_draft_decoding_keeps_the_real_models_predictions(
    default_classifiers: tuple[Classifier, Classifier], tmp_path: Path
) -> None:
    _, onnx = default_classifiers
    for name in PHOTOS:
        path = tmp_path / f"{name}.jpg"
        photo(name).resize((4000, 3000), Image.LANCZOS).save(path, quality=90)
        drafted, full = onnx.predict_probs([onnx.open(path)]), onnx.predict_probs([open_image(path)])
        assert drafted.argmax() == full.argmax(), name
        assert np.abs(drafted - full).max() < 0.05, name
