"""The frozen layers' activations computed once (finetune/trunk_cache.py): where networks split, that a split
which changes the outputs is refused, and that training on the cached activations makes the updates that
training through the frozen layers makes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TINY_MODEL, write_digits_folder
from multilabel_data import write_digit_mosaics

from finetune.augment import normalize
from finetune.checkpoint import load_run
from finetune.config import TrainConfig
from finetune.distributed import DistContext
from finetune.engine import EpochSettings, Optimization, train_one_epoch
from finetune.pixel_cache import CachedImages, CachedPixels
from finetune.precision import Precision
from finetune.trainer import _freeze_early_layers, fine_tune
from finetune.trunk_cache import (
    TRUNK_CACHE_DIR,
    TRUNK_FILES,
    ActivationSettings,
    compute_activations,
    find_trunk,
    shift_maps,
)

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU = Precision(torch.device("cpu"), None)


def _images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (count, 3, size, size), generator=torch.Generator().manual_seed(seed)).to(
        torch.uint8
    )


def _cached(pixels: torch.Tensor, num_classes: int = 3) -> CachedImages:
    targets = torch.arange(len(pixels)) % num_classes
    array = pixels.numpy()
    return CachedImages(
        CachedPixels(array, np.arange(len(array))), targets, [Path(f"{i}.png") for i in range(len(pixels))]
    )


@pytest.mark.parametrize(
    ("name", "boundary"),
    [
        ("test_efficientnet", "blocks."),
        ("test_resnet", "layer"),
        ("test_convnext", "stages."),
        ("test_vit", "blocks."),
    ],
)
def test_networks_split_after_their_frozen_half_and_the_cached_path_gives_their_outputs(
    tmp_path: Path, name: str, boundary: str
) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=3)
    _freeze_early_layers(model, -1)
    size = model.pretrained_cfg["input_size"][-1]
    data = _cached(_images(10, size))
    trunk = find_trunk(model, data.pixels[torch.arange(4)], MEAN, STD)
    assert trunk is not None and trunk.boundary.startswith(boundary)
    assert all(p.requires_grad for p in trunk.module(model).parameters())
    settings = ActivationSettings(MEAN, STD, CPU, DistContext(), batch_size=4)
    cached = compute_activations(model, trunk, data, tmp_path / "trunk.npy", settings)
    assert cached is not None and cached.array.dtype == np.float16 and len(cached) == 10
    model.eval()
    index = torch.tensor([7, 2, 9])  # unsorted rows, as a shuffled batch reads them
    with torch.no_grad():
        expected = model(normalize(data.pixels[index], MEAN, STD))
        with cached.inputs(model, index, torch.device("cpu")) as placeholder:
            assert placeholder.shape[0] == 1  # the frozen layers run on one image, not the batch
            fed = model(placeholder)
    # float16 activations: close to the fp32 outputs, and closer than another image's outputs are
    tolerance = {"rtol": 2e-2, "atol": 2e-2 * float(expected.abs().max())}
    torch.testing.assert_close(fed, expected, **tolerance)
    assert not torch.allclose(fed, expected[[1, 2, 0]], **tolerance)  # rows fed in the wrong order would fail


class _LongSkip(torch.nn.Module):
    """A network whose head also reads the frozen layer's output directly, past the trainable layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.body = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)
        self.stem.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        early = self.stem(x)
        return self.head((self.body(early) + early).mean(dim=(2, 3)))


def test_a_split_that_would_change_the_outputs_is_refused() -> None:
    pixels = _images(4, 16)
    assert find_trunk(_LongSkip(), pixels, MEAN, STD) is None  # the skip would read the placeholder's stem
    nothing_frozen = timm.create_model(TINY_MODEL, num_classes=3)
    assert find_trunk(nothing_frozen, _images(4, 32), MEAN, STD) is None


def test_training_on_cached_activations_makes_the_same_updates(tmp_path: Path) -> None:
    torch.manual_seed(0)
    models = [timm.create_model(TINY_MODEL, num_classes=3) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    start = {k: v.clone() for k, v in models[0].state_dict().items()}
    data = _cached(_images(48, 32))
    for model in models:
        _freeze_early_layers(model, -1)
    trunk = find_trunk(models[1], data.pixels[torch.arange(4)], MEAN, STD)
    cached = compute_activations(
        models[1], trunk, data, tmp_path / "trunk.npy", ActivationSettings(MEAN, STD, CPU, DistContext())
    )
    for model, activations in zip(models, (None, cached), strict=True):
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        scheduler = type("Constant", (), {"step_update": lambda self, num_updates: None})()
        opt = Optimization(optimizer, scheduler, torch.nn.CrossEntropyLoss())
        settings = EpochSettings(CPU, DistContext(), MEAN, STD, batch_size=8, jitter=False, trunk=activations)
        for epoch in (1, 2):
            train_one_epoch(model, data, settings, opt, epoch)
    through, fed = models[0].state_dict(), models[1].state_dict()
    trained = [k for k, p in models[0].named_parameters() if p.requires_grad]
    assert trained and all(not torch.equal(through[k], start[k]) for k in trained)  # 12 updates moved them
    for key in through:
        torch.testing.assert_close(fed[key], through[key], rtol=1e-2, atol=1e-3)


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data_dir=data, out=out, model=TINY_MODEL, weights="none", img_size=48, epochs=3, batch_size=8,
        quiet=True, probe_epochs=20, patience=5, augment="off", frozen_groups=2,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_a_run_without_jitter_trains_on_the_cached_activations_like_one_without_them(tmp_path: Path) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=16)
    cached = fine_tune(_config(data, tmp_path / "cached"))
    plain = fine_tune(_config(data, tmp_path / "plain", trunk_cache=False))
    plan = json.loads((tmp_path / "cached" / "config.json").read_text())["studio"]["plan"]
    assert plan["trunk_cache"]["boundary"].startswith("blocks.")
    assert "trunk_cache" not in json.loads((tmp_path / "plain" / "config.json").read_text())["studio"]["plan"]
    assert not any((tmp_path / "cached" / TRUNK_CACHE_DIR / name).exists() for name in TRUNK_FILES)
    assert [row["epoch"] for row in cached.history] == [row["epoch"] for row in plain.history]
    for a, b in zip(cached.history, plain.history, strict=True):  # every epoch scores alike
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a.get("train_loss", 0) == pytest.approx(b.get("train_loss", 0), rel=1e-3)
    assert cached.metrics["val_top1"] == plain.metrics["val_top1"]
    # jitter on: the frozen layers see other pixels every epoch, so nothing is cached
    jittered = fine_tune(_config(data, tmp_path / "jitter", augment="on", epochs=1))
    assert "trunk_cache" not in json.loads((jittered.run_dir / "config.json").read_text())["studio"]["plan"]


def test_a_resumed_run_computes_the_activations_again_and_ends_where_an_uninterrupted_one_does(
    tmp_path: Path,
) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1), per_class=12)
    full = fine_tune(_config(data, tmp_path / "full"))
    epochs_seen: list[int] = []

    def record(event) -> None:
        if event.kind == "epoch":
            epochs_seen.append(event.epoch)

    stopped = fine_tune(
        _config(data, tmp_path / "cut"), on_event=record, should_stop=lambda: len(epochs_seen) >= 2
    )
    assert stopped.interrupted
    resumed = fine_tune(_config(data, tmp_path / "cut"), resume=True)
    assert [row["epoch"] for row in resumed.history] == [row["epoch"] for row in full.history]
    assert resumed.metrics["val_top1"] == pytest.approx(full.metrics["val_top1"])
    a, b = load_run(tmp_path / "full").model.state_dict(), load_run(tmp_path / "cut").model.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)


def test_a_multi_label_run_with_frozen_layers_trains_as_they_are_on_cached_activations(
    tmp_path: Path,
) -> None:
    csv_path = write_digit_mosaics(tmp_path / "data", count=48)
    config = _config(csv_path, tmp_path / "run", augment="auto", epochs=0, time_budget_s=600)
    result = fine_tune(config)
    plan = json.loads((tmp_path / "run" / "config.json").read_text())["studio"]["plan"]
    assert plan["augment"]["jitter"] is False and plan["augment"]["trunk_shift"] is True
    assert plan["trunk_cache"]["boundary"].startswith("blocks.")
    assert result.metrics["val_map"] > 0
    # flips change every image's activations: the frozen layers run in each step, and the jitter stays
    fine_tune(_config(csv_path, tmp_path / "flips", augment="auto", epochs=1, hflip=True))
    flipped = json.loads((tmp_path / "flips" / "config.json").read_text())["studio"]["plan"]
    assert flipped["augment"]["jitter"] is True and "trunk_cache" not in flipped
    # --augment off: cached, and used as they are
    fine_tune(_config(csv_path, tmp_path / "off", augment="off", epochs=1))
    off = json.loads((tmp_path / "off" / "config.json").read_text())["studio"]["plan"]
    assert "trunk_cache" in off and off["augment"]["trunk_shift"] is False


def test_cached_activations_shift_by_whole_cells_with_their_edges_repeated() -> None:
    maps = torch.arange(16 * 2 * 14 * 14, dtype=torch.float32).view(16, 2, 14, 14)
    shifted = shift_maps(maps, torch.Generator().manual_seed(0))
    assert shifted.shape == maps.shape
    padded = torch.nn.functional.pad(maps, (1, 1, 1, 1), mode="replicate")
    moves = []
    for out, source in zip(shifted, padded, strict=True):
        matches = [
            (dy - 1, dx - 1)
            for dy in range(3)
            for dx in range(3)
            if torch.equal(out, source[:, dy : dy + 14, dx : dx + 14])
        ]
        assert len(matches) == 1  # one whole-cell move of at most one cell (7% of a 14-cell map)
        moves.append(matches[0])
    assert len(set(moves)) > 3  # moved differently, at random
    again = shift_maps(maps, torch.Generator().manual_seed(0))
    assert torch.equal(again, shifted)  # seeded: a resumed epoch repeats
    small = torch.randn(4, 2, 6, 6)
    assert torch.equal(shift_maps(small, torch.Generator().manual_seed(0)), small)  # 6% of 6 cells: no move
