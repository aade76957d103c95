"""Model creation: the embedded ImageNet weights really work, and weights problems are explained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import photo
from safetensors.torch import save_file

from finetune.checkpoint import load_default_run
from finetune.errors import CheckpointError, ConfigError, WeightsUnavailableError
from finetune.inference import Classifier
from finetune.modeling import create_model_and_transforms, embedded_weights_path


@pytest.fixture(scope="module")
def imagenet_classifier() -> Classifier:
    return Classifier(load_default_run())


def test_embedded_weights_ship_with_the_package() -> None:
    path = embedded_weights_path()
    assert path is not None and path.stat().st_size > 10_000_000


def test_embedded_model_calls_chelsea_a_cat(imagenet_classifier: Classifier) -> None:
    prediction = imagenet_classifier.predict([photo("chelsea")], k=3)[0]
    assert prediction.label in {"tiger cat", "Egyptian cat", "tabby"}
    assert sum(prediction.probs) > 0.8


def test_embedded_model_calls_coffee_an_espresso(imagenet_classifier: Classifier) -> None:
    prediction = imagenet_classifier.predict([photo("coffee")], k=1)[0]
    assert prediction.label == "espresso"
    assert prediction.prob > 0.9


def test_new_head_keeps_the_backbone_weights() -> None:
    reference = create_model_and_transforms(num_classes=1000).model.state_dict()
    created = create_model_and_transforms(num_classes=7)
    state = created.model.state_dict()
    assert created.weights_source.startswith("embedded:")
    assert torch.equal(state["conv_stem.weight"], reference["conv_stem.weight"])
    assert state["classifier.weight"].shape == (7, 1280)


def test_unknown_model_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model 'resnet_9000'.*Similar names"):
        create_model_and_transforms("resnet_9000", num_classes=2)


def test_weights_that_need_a_download_explain_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsUnavailableError, match="--weights FILE"):
        create_model_and_transforms("resnet18", num_classes=2)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_weights_file_is_loaded(tmp_path: Path, suffix: str) -> None:
    source = create_model_and_transforms("test_efficientnet", num_classes=1000, weights="none").model
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    else:
        torch.save(source.state_dict(), path)
    created = create_model_and_transforms("test_efficientnet", num_classes=3, weights=str(path))
    assert created.weights_source == f"file:{path}"
    assert torch.equal(
        created.model.state_dict()["conv_stem.weight"], source.state_dict()["conv_stem.weight"]
    )


def test_weights_file_for_another_architecture_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vit.safetensors"
    vit = create_model_and_transforms("test_vit", num_classes=3, weights="none").model
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(path))
    with pytest.raises(CheckpointError, match="another architecture"):
        create_model_and_transforms("test_efficientnet", num_classes=3, weights=str(path))
