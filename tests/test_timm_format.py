"""A run folder is a timm folder: timm alone loads the fine-tuned model, its labels and its preprocessing."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest
import timm
import torch
from conftest import photo
from run_factory import LABELS, shared_trained_run
from timm.data import create_transform, resolve_data_config

from finetune.checkpoint import load_run
from finetune.model_card import CARD_FILE, write_model_card


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_trained_run(tmp_path_factory)


def test_timm_local_dir_gives_the_same_logits_as_load_run(run_dir: Path) -> None:
    ours = load_run(run_dir)
    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True).eval()
    batch = torch.stack([ours.transform(photo(name)) for name in ("chelsea", "coffee", "rocket")])
    with torch.no_grad():
        expected, actual = ours.model(batch), model(batch)
    assert actual.shape == (3, len(LABELS))
    assert torch.allclose(actual, expected, atol=1e-5)
    assert not torch.allclose(actual, timm.create_model(f"local-dir:{run_dir}").eval()(batch), atol=1e-3), (
        "without pretrained=True timm builds random weights; the test must load the trained ones"
    )


def test_timm_pretrained_cfg_carries_labels_and_training_preprocessing(run_dir: Path) -> None:
    ours = load_run(run_dir)
    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    assert model.pretrained_cfg["label_names"] == LABELS == ours.labels
    assert model.num_classes == len(LABELS)
    resolved = resolve_data_config({}, model=model)
    for key in ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"):
        assert _plain(resolved[key]) == _plain(ours.data_config[key]), key
    assert list(resolved["input_size"]) == [
        3,
        32,
        32,
    ]  # the size training used, not the architecture's default


def test_timm_transform_equals_our_eval_transform(run_dir: Path) -> None:
    ours = load_run(run_dir)
    model = timm.create_model(f"local-dir:{run_dir}", pretrained=True)
    theirs = create_transform(**resolve_data_config({}, model=model), is_training=False)
    image = photo("astronaut")
    assert torch.equal(theirs(image), ours.transform(image))


def test_model_card_timm_snippet_runs_as_written(run_dir: Path, tmp_path: Path, photo_dir: Path) -> None:
    write_model_card(run_dir, output_dir=tmp_path)
    card = (tmp_path / CARD_FILE).read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", card, re.DOTALL).group(1)
    assert f'"local-dir:{run_dir}"' in code
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        exec(code.replace('"photo.jpg"', repr(str(photo_dir / "coffee.jpg"))), {})  # noqa: S102
    label, probability = output.getvalue().split()
    assert label in LABELS
    assert 0.0 < float(probability) <= 1.0


def _plain(value: object) -> object:
    return list(value) if isinstance(value, (list, tuple)) else value
