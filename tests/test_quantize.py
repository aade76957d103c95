"""The opt-in INT8 export: calibrated on the run's own images, checked against FP32, refused if it differs."""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import needs_int8_dot_product, write_digits_folder
from run_factory import shared_trained_run

from finetune import quantize
from finetune.checkpoint import load_run
from finetune.errors import CheckpointError, RuntimeUnavailableError
from finetune.export import ONNX_FILE, main, weights_fingerprint
from finetune.images import open_image
from finetune.inference import META_PRECISION, OnnxClassifier
from finetune.quantize import INT8_FILE, read_int8_report
from finetune.runtime import create_classifier
from finetune.split import SPLIT_FILE, read_split, write_split

NO_EXPORTS = shutil.ignore_patterns("*.onnx")


@pytest.fixture
def run_dir(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of a really trained run whose dataset (3 digit classes, 12 images each) is on disk."""
    return Path(shutil.copytree(shared_trained_run(tmp_path_factory), tmp_path / "run", ignore=NO_EXPORTS))


@needs_int8_dot_product
def test_int8_export_is_calibrated_and_checked_on_the_runs_own_images(
    run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(run_dir), "--int8", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run_dir / INT8_FILE}" in out
    # the run's recorded split (split.json): 8 training and 4 validation digits per class
    assert "calibrated on 24 images; same top-1 as FP32 on 12/12 held-out validation images" in out

    run = load_run(run_dir)
    int8 = create_classifier(run, "onnx-int8")  # finds the CLI's file rather than quantizing again
    assert isinstance(int8, OnnxClassifier) and int8.runtime == "onnx-int8"
    assert int8.onnx_path == run_dir / INT8_FILE
    assert int8.metadata[META_PRECISION] == "int8"
    assert int8.metadata["studio.fingerprint"] == weights_fingerprint(run)
    assert json.loads(int8.metadata["studio.labels"]) == run.labels
    report = read_int8_report(int8)
    assert report is not None and report.source == "held-out validation images"
    assert (report.n_calibration, report.n_images, report.top1_agree) == (24, 12, 12)
    assert report.int8_top1 is not None and report.fp32_top1 is not None
    assert report.int8_top1 >= report.fp32_top1 - quantize.MAX_ACCURACY_DROP
    graph = onnx.load(str(run_dir / INT8_FILE)).graph
    assert {"QuantizeLinear", "DequantizeLinear"} <= {node.op_type for node in graph.node}
    int8_weights = [init for init in graph.initializer if init.data_type == onnx.TensorProto.INT8]
    assert len(int8_weights) >= sum(node.op_type == "Conv" for node in graph.node)  # every conv's weights

    fp32 = create_classifier(run, "onnx")
    assert fp32.runtime == "onnx" and fp32.onnx_path == run_dir / ONNX_FILE  # "onnx" stays exact FP32
    folder = write_digits_folder(tmp_path / "digits", per_class=40)  # 28 per class it has never seen
    images = [open_image(path) for path in sorted(folder.rglob("*.png"))]
    expected, actual = fp32.predict_probs(images), int8.predict_probs(images)
    assert (expected.argmax(axis=1) == actual.argmax(axis=1)).mean() >= quantize.MIN_TOP1_AGREEMENT
    assert not np.array_equal(expected, actual)  # really a different (quantized) model


def test_the_check_uses_the_recorded_split_and_only_its_unchanged_files(
    run_dir: Path, tmp_path: Path
) -> None:
    """A file added since training stays out, and changed validation files are left out of the check."""
    record = read_split(run_dir)
    assert record is not None
    data = Path(shutil.copytree(record.data_dir, tmp_path / "digits"))
    write_split(run_dir, replace(record, data_dir=data))
    val = [data / f.path for f in record.files if f.subset == "val"]
    shutil.copy(val[0], data / "digit_2" / "added.png")  # a new file: neither calibrated on nor checked
    for changed in val[1:3]:
        changed.write_bytes(val[3].read_bytes())  # same class, other bytes
    (data / val[4].relative_to(data)).unlink()
    images = quantize.quantization_images(load_run(run_dir), photos=[])
    assert images.source == "held-out validation images"
    assert (len(images.calibration), len(images.check)) == (24, 12 - 3)


@needs_int8_dot_product
def test_without_its_recorded_split_a_run_is_calibrated_on_views_of_the_photos(run_dir: Path) -> None:
    """A run saved before splits were recorded: its folder is not re-split (that could leak); photos are."""
    (run_dir / SPLIT_FILE).unlink()
    run = load_run(run_dir)
    classifier = create_classifier(run, "onnx-int8")  # quantized on first use, like the app does
    report = read_int8_report(classifier)
    assert report is not None and report.source == "check photos" and report.fp32_top1 is None
    assert report.n_calibration == quantize.VIEWS_PER_PHOTO * report.n_images
    assert (run_dir / INT8_FILE).is_file()


def test_a_quantization_that_fails_its_check_writes_nothing(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(quantize, "MIN_TOP1_AGREEMENT", 1.01)  # no model can pass: the refusal path
    monkeypatch.setattr(quantize, "has_int8_dot_product", lambda: True)
    assert main([str(run_dir), "--int8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "changes this model's answers too much" in err and "--runtime onnx" in err
    assert "dot-product" not in err  # the CPU is not blamed where it has the instructions
    assert (run_dir / ONNX_FILE).is_file() and not (run_dir / INT8_FILE).exists()
    assert [path.name for path in run_dir.iterdir() if ".tmp" in path.name] == []
    with pytest.raises(CheckpointError, match="too much"):
        create_classifier(load_run(run_dir), "onnx-int8")  # asked for explicitly: no silent FP32


def test_a_refusal_on_a_cpu_without_int8_dot_products_says_so(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(quantize, "MIN_TOP1_AGREEMENT", 1.01)
    monkeypatch.setattr(quantize, "has_int8_dot_product", lambda: False)
    assert main([str(run_dir), "--int8", "--quiet"]) == 2
    err = " ".join(capsys.readouterr().err.split())
    assert "too much" in err and "no 8-bit dot-product instructions" in err and "saturate" in err
    assert not (run_dir / INT8_FILE).exists()


@needs_int8_dot_product
def test_an_fp32_file_under_the_int8_name_is_quantized_again(run_dir: Path) -> None:
    run = load_run(run_dir)
    fp32 = create_classifier(run, "onnx")
    shutil.copy(fp32.onnx_path, run_dir / INT8_FILE)
    int8 = create_classifier(run, "onnx-int8")
    assert int8.metadata[META_PRECISION] == "int8"


def test_int8_runtime_without_onnxruntime_is_a_clear_error(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(RuntimeUnavailableError, match="--runtime onnx-int8 needs onnxruntime"):
        create_classifier(load_run(run_dir), "onnx-int8")


@needs_int8_dot_product
def test_the_app_serves_the_int8_export_when_asked(run_dir: Path, tmp_path: Path) -> None:
    from demo.classify_tab import model_card
    from demo.service import InferenceService

    service = InferenceService.from_checkpoint(run_dir, runtime="onnx-int8")
    try:
        assert service.info().runtime == "onnx-int8"
        assert "runtime: onnx-int8" in model_card(service.info())
        folder = write_digits_folder(tmp_path / "digits", classes=(1,), per_class=1)
        prediction = service.predict_topk(next(folder.rglob("*.png")), k=3)
        assert prediction.labels[0] in load_run(run_dir).labels and len(prediction.labels) == 3
    finally:
        service.close()


def test_a_graph_the_quantizer_cannot_handle_is_one_clear_error(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime.quantization

    def unsupported(*args: object, **kwargs: object) -> None:  # what ORT raises on an op it cannot quantize
        raise RuntimeError("Unsupported op type for quantization\n(internal details)")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", unsupported)
    assert main([str(run_dir), "--int8", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "cannot be quantized to INT8 (RuntimeError: Unsupported op" in err
    assert "--runtime onnx" in err and len(err.splitlines()) == 1
    assert not (run_dir / INT8_FILE).exists()
