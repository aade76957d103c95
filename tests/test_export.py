"""`python -m finetune.export`: a checked, deterministic, dynamic-batch model.onnx, and clear refusals."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import photo

from finetune.checkpoint import load_run
from finetune.errors import CheckpointError
from finetune.export import ONNX_FILE, export_onnx, main, weights_fingerprint

ROOT = Path(__file__).resolve().parents[1]


# other tests serve the shared tiny run with runtime "auto", which exports model.onnx into it
NO_ONNX = shutil.ignore_patterns("model.onnx")


@pytest.fixture
def run_dir(tmp_path: Path, untrained_run_dir: Path) -> Path:
    """A private copy of the tiny run, so exports into it do not leak into other tests."""
    return Path(shutil.copytree(untrained_run_dir, tmp_path / "run", ignore=NO_ONNX))


def test_export_writes_a_checked_model_with_a_dynamic_batch_axis(
    run_dir: Path, photo_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnxruntime as ort

    assert main([str(run_dir), "--onnx", "--images", str(photo_dir), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {run_dir / ONNX_FILE}" in out
    assert "checked on 4 images: max probability difference" in out
    assert "same top-1 on 4/4" in out

    session = ort.InferenceSession(str(run_dir / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert isinstance(session.get_inputs()[0].shape[0], str)  # symbolic: any batch size
    run = load_run(run_dir)
    assert session.get_modelmeta().custom_metadata_map["studio.fingerprint"] == weights_fingerprint(run)
    batch = np.random.default_rng(0).standard_normal((5, *run.data_config["input_size"])).astype(np.float32)
    whole = session.run(None, {"input": batch})[0]
    one_by_one = np.concatenate([session.run(None, {"input": batch[i : i + 1]})[0] for i in range(5)])
    assert whole.shape == (5, 3)
    np.testing.assert_allclose(whole, one_by_one, atol=1e-5)


def test_export_is_deterministic(run_dir: Path, tmp_path: Path) -> None:
    for name in ("a", "b"):
        assert main([str(run_dir), "--out", str(tmp_path / name), "--quiet"]) == 0
    assert (tmp_path / "a" / ONNX_FILE).read_bytes() == (tmp_path / "b" / ONNX_FILE).read_bytes()


def bad_folder(kind: str, root: Path) -> Path:
    """Folders that are not runs: a missing path, an empty folder, a folder with a damaged config.json."""
    if kind == "missing":
        return root / "missing"
    if kind == "damaged-config":
        (root / "config.json").write_text("{not json")
    return root


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing", "is not a folder"),
        ("empty", "has no config.json"),
        ("damaged-config", "is not valid JSON"),
    ],
)
def test_export_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, kind: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(bad_folder(kind, tmp_path)), "--onnx", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
    assert not (tmp_path / ONNX_FILE).exists()


def test_export_refuses_damaged_weights(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (run_dir / "model.safetensors").write_bytes(b"\x80\x04pickle, not safetensors")
    assert main([str(run_dir), "--onnx", "--quiet"]) == 2
    assert "not a valid safetensors file" in capsys.readouterr().err
    assert not (run_dir / ONNX_FILE).exists()


def test_export_without_onnxruntime_says_how_to_install_it(
    run_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` sees when not installed
    assert main([str(run_dir), "--onnx", "--quiet"]) == 2
    assert "pip install onnxruntime" in capsys.readouterr().err
    assert not (run_dir / ONNX_FILE).exists()


def test_an_export_that_fails_its_check_is_not_written(run_dir: Path) -> None:
    run = load_run(run_dir)
    with pytest.raises(CheckpointError, match="disagrees with PyTorch"):
        export_onnx(run, run_dir / ONNX_FILE, [photo("chelsea")], tolerance=-1.0)  # nothing can pass
    assert not (run_dir / ONNX_FILE).exists()
    assert not list(run_dir.glob(f".{ONNX_FILE}.*"))  # no temporary file left behind either


def test_export_module_entry_point_reports_errors_in_one_line(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "finetune.export", str(tmp_path / "nope"), "--onnx"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: checkpoint")
    assert "Traceback" not in result.stderr
