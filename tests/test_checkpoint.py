"""The run format: round trips with identical logits, and refusal of anything damaged, pickled or unknown."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest
import timm
import torch

from finetune.checkpoint import (
    load_run,
    load_train_state,
    read_run_config,
    save_run,
    save_train_state,
)
from finetune.errors import CheckpointError
from finetune.modeling import create_model_and_transforms


@pytest.mark.parametrize("architecture", ["test_efficientnet", "test_vit"])
def test_save_then_load_gives_identical_logits(tmp_path: Path, architecture: str) -> None:
    created = create_model_and_transforms(architecture, num_classes=4, weights="none")
    model = created.model.eval()
    save_run(tmp_path / "run", model, ["a", "b", "c", "d"], created.data_config, {"note": "round trip"})
    loaded = load_run(tmp_path / "run")
    size = created.data_config["input_size"][-1]
    batch = torch.randn(3, 3, size, size)
    with torch.no_grad():
        assert torch.allclose(model(batch), loaded.model(batch), atol=1e-6)
    assert loaded.labels == ["a", "b", "c", "d"]
    assert loaded.data_config == created.data_config
    assert loaded.studio == {"note": "round trip"}
    assert not loaded.model.training


def test_run_folder_is_a_timm_local_dir(untrained_run_dir: Path) -> None:
    ours = load_run(untrained_run_dir)
    theirs = timm.create_model(f"local-dir:{untrained_run_dir}", pretrained=True).eval()
    assert theirs.pretrained_cfg["label_names"] == ["cat", "coffee", "rocket"]
    batch = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(ours.model(batch), theirs(batch), atol=1e-6)


def test_pickle_posing_as_checkpoint_is_refused(tmp_path: Path, untrained_run_dir: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(untrained_run_dir, run_dir)

    class Exploit:
        def __reduce__(self):  # would run a command if unpickled
            return (Path("/tmp/pwned-by-checkpoint").touch, ())

    (run_dir / "model.safetensors").write_bytes(pickle.dumps({"weights": Exploit()}))
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_run(run_dir)
    assert not Path("/tmp/pwned-by-checkpoint").exists()


def test_pytorch_bin_only_is_refused_with_a_reason(tmp_path: Path, untrained_run_dir: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(untrained_run_dir, run_dir)
    (run_dir / "model.safetensors").rename(run_dir / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle and is never loaded"):
        load_run(run_dir)


def test_unknown_schema_version_is_refused(tmp_path: Path, untrained_run_dir: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(untrained_run_dir, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["schema_version"] = 99
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="schema_version 99"):
        read_run_config(run_dir)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda d: (d / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda d: (d / "config.json").unlink(), "no config.json"),
        (lambda d: (d / "model.safetensors").unlink(), "no model.safetensors"),
        (lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 10), "not a valid safetensors"),
    ],
)
def test_damaged_run_folders_give_clear_errors(
    tmp_path: Path, untrained_run_dir: Path, damage, message
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(untrained_run_dir, run_dir)
    damage(run_dir)
    with pytest.raises(CheckpointError, match=message):
        load_run(run_dir)


def test_weights_of_another_shape_are_refused(tmp_path: Path, untrained_run_dir: Path) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(untrained_run_dir, run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    config["num_classes"] = 5
    config["label_names"] = list("abcde")
    (run_dir / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not match"):
        load_run(run_dir)


def test_missing_folder_and_file_instead_of_folder(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not a folder"):
        load_run(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a folder"):
        load_run(tmp_path / "file")


def test_train_state_round_trip_and_torn_state_detection(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3, "pair": (1, "x")}
    save_train_state(tmp_path, state)
    restored = load_train_state(tmp_path)
    assert restored["epoch"] == 3 and restored["pair"] == (1, "x")
    assert torch.equal(restored["model"]["weight"], model.weight.detach())
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=0.1)
    fresh.load_state_dict(restored["optimizer"])
    assert torch.equal(
        fresh.state_dict()["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"]
    )
    meta = json.loads((tmp_path / "train_state.json").read_text())
    meta["state_id"] = "something-else"
    (tmp_path / "train_state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="inconsistent"):
        load_train_state(tmp_path)
