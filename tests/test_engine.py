"""Engine pieces on their own: CUDA autocast, the linear probe's loss and sampler, the fused optimizer."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import timm
import torch
from timm.optim import create_optimizer_v2

from finetune.checkpoint import load_train_state, save_train_state
from finetune.config import TrainConfig
from finetune.optimizers import create_optimizer
from finetune.precision import (
    FP32_TRAINING_MAX_PX,
    Precision,
    cuda_autocast_dtype,
    resolve_precision,
    training_precision,
)
from finetune.probe import fit_linear_probe


@pytest.mark.parametrize(
    ("requested", "capability", "expected"),
    [
        ("auto", (7, 5), torch.float16),  # T4: bf16 is only emulated
        ("auto", (7, 0), torch.float16),  # V100
        ("auto", (8, 0), torch.bfloat16),  # A100
        ("auto", (8, 6), torch.bfloat16),  # RTX 30xx
        ("auto", (9, 0), torch.bfloat16),  # H100
        ("fp16", (9, 0), torch.float16),
        ("bf16", (8, 0), torch.bfloat16),
    ],
)
def test_cuda_autocast_uses_bf16_only_where_the_gpu_has_it(requested, capability, expected) -> None:
    assert cuda_autocast_dtype(requested, capability) == expected


def test_an_explicit_bf16_on_an_older_gpu_is_obeyed_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="finetune.precision"):
        assert cuda_autocast_dtype("bf16", (7, 5)) == torch.bfloat16
    assert "only emulates bf16" in caplog.text


@pytest.mark.parametrize(("capability", "name", "scaled"), [((7, 5), "fp16", True), ((8, 0), "bf16", False)])
def test_resolve_precision_on_cuda_reads_the_devices_capability(
    monkeypatch: pytest.MonkeyPatch, capability, name: str, scaled: bool
) -> None:
    """No GPU here: the capability query is the one thing faked; fp16 comes with a grad scaler."""
    asked = []
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda dev: asked.append(dev) or capability)
    precision = resolve_precision("auto", torch.device("cuda", 0))
    assert asked == [torch.device("cuda", 0)]
    assert precision.name == name and precision.needs_grad_scaler is scaled
    assert resolve_precision("fp32", torch.device("cuda", 0)).name == "fp32"


def test_cpu_training_steps_on_small_images_run_in_fp32_unless_the_cpu_has_amx_or_bf16_is_asked_for(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench/train_precision.py: without AMX a CPU backpropagates faster in fp32 on small images, and large
    fp32 activations cost memory for no speed; evaluation keeps bf16."""
    cpu_bf16 = Precision(torch.device("cpu"), torch.bfloat16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert training_precision(cpu_bf16, "auto", 64).name == "fp32"
    assert training_precision(cpu_bf16, "auto", FP32_TRAINING_MAX_PX).name == "fp32"
    assert training_precision(cpu_bf16, "auto", 224) is cpu_bf16
    assert training_precision(cpu_bf16, "bf16", 64) is cpu_bf16  # an explicit --precision is obeyed
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    assert training_precision(cpu_bf16, "auto", 64) is cpu_bf16
    gpu_fp16 = Precision(torch.device("cuda", 0), torch.float16)
    assert training_precision(gpu_fp16, "auto", 64) is gpu_fp16


def imbalanced_features(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Two overlapping 2-D Gaussian classes, 200 images of class 0 and 10 of class 1."""
    generator = torch.Generator().manual_seed(seed)
    majority = torch.randn(200, 2, generator=generator)
    minority = torch.randn(10, 2, generator=generator) + torch.tensor([1.5, 0.0])
    return torch.cat([majority, minority]), torch.tensor([0] * 200 + [1] * 10)


def test_sampler_weights_balance_the_probe() -> None:
    """With class-balanced sampling, the probe stops predicting the majority class for ambiguous images."""
    features, targets = imbalanced_features()
    weights = torch.where(targets == 1, 210 / (2 * 10), 210 / (2 * 200)).float()
    grid = torch.stack([torch.linspace(-1, 2.5, 50), torch.zeros(50)], dim=1)  # from class 0 to class 1
    plain = fit_linear_probe(features, targets, 2, epochs=60, seed=0)
    balanced = fit_linear_probe(features, targets, 2, epochs=60, seed=0, sample_weights=weights)
    with torch.no_grad():
        plain_share = (plain(grid).argmax(1) == 1).float().mean().item()
        balanced_share = (balanced(grid).argmax(1) == 1).float().mean().item()
    assert balanced_share > plain_share + 0.15, (plain_share, balanced_share)


def test_the_probe_takes_the_fine_tuning_label_smoothing() -> None:
    """Label smoothing caps the probe's confidence near 1 - smoothing/2, as it caps the fine-tuned model's."""
    generator = torch.Generator().manual_seed(0)
    targets = torch.tensor([0] * 100 + [1] * 100)
    features = torch.randn(200, 512, generator=generator) + (targets[:, None] * 2 - 1) * 0.5  # separable
    confidence = {}
    for smoothing in (0.0, 0.1):
        head = fit_linear_probe(features, targets, 2, epochs=60, seed=0, label_smoothing=smoothing)
        with torch.no_grad():
            confidence[smoothing] = head(features).softmax(1).max(1).values.mean().item()
    assert confidence[0.0] > 0.99
    assert 0.9 < confidence[0.1] < 0.97


def _stepped(optimizer: torch.optim.Optimizer, model: torch.nn.Module, steps: int, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for parameter in model.parameters():
            parameter.grad = torch.randn(parameter.shape, generator=generator) * 1e-2
        optimizer.step()


def test_adamw_runs_fused_with_the_same_updates_and_a_saved_state_resumes_on_channels_last_weights(
    tmp_path: Path,
) -> None:
    config = TrainConfig(data_dir=Path("unused"), out=Path("unused"), opt="adamw", layer_decay=0.85)
    cpu = torch.device("cpu")
    models = [timm.create_model("test_efficientnet", num_classes=3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    for model in models:  # as the trainer lays them out; the hand-written gradients below stay contiguous
        model.to(memory_format=torch.channels_last)
    fused = create_optimizer(models[0], config, 1e-3, cpu)
    plain = create_optimizer_v2(
        models[1], opt="adamw", lr=1e-3, weight_decay=config.weight_decay, layer_decay=0.85
    )
    assert fused.defaults["fused"] is True and not plain.defaults.get("fused")
    assert len(fused.param_groups) == len(plain.param_groups) > 1  # layer decay kept
    _stepped(fused, models[0], 3)
    _stepped(plain, models[1], 3)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # saved to disk (contiguous tensors) and resumed: the next updates still match the uninterrupted plain run
    save_train_state(tmp_path, {"optimizer": fused.state_dict()})
    resumed = create_optimizer(models[0], config, 1e-3, cpu)
    resumed.load_state_dict(load_train_state(tmp_path)["optimizer"])
    _stepped(resumed, models[0], 2, seed=1)
    _stepped(plain, models[1], 2, seed=1)
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_optimizers_without_a_fused_kernel_are_built_as_timm_builds_them() -> None:
    model = timm.create_model("test_efficientnet", num_classes=3)
    optimizer = create_optimizer(
        model, TrainConfig(data_dir=Path("unused"), out=Path("unused"), opt="sgd"), 1e-2, torch.device("cpu")
    )
    assert isinstance(optimizer, torch.optim.SGD) and not optimizer.defaults.get("fused")
