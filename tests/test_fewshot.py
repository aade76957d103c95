"""Few-shot data under `auto`: the probe only, its head refitted on train + val (finetune/recipe.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MODEL, write_digits_folder
from safetensors.torch import load_file

from finetune.config import TrainConfig
from finetune.evaluate import evaluate_folder
from finetune.probe_refit import C_GRID
from finetune.recipe import FEW_SHOT_PER_CLASS
from finetune.trainer import fine_tune

HEAD = ("classifier.weight", "classifier.bias")


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(
        data_dir=data, out=out, model=TINY_MODEL, weights="none", img_size=48, batch_size=8, quiet=True,
        probe_epochs=20,
    )  # fmt: skip
    values.update(overrides)
    return TrainConfig(**values)


def test_few_shot_auto_keeps_the_probe_and_refits_its_head_on_train_and_val(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = write_digits_folder(tmp_path / "digits", classes=(0, 1, 2), per_class=10)
    out = tmp_path / "run"
    probe_weights: dict[str, torch.Tensor] = {}

    def keep_probe_checkpoint(event) -> None:  # the probe's checkpoint, before the closing refit
        if event.kind == "epoch" and event.phase == "probe":
            probe_weights.update(load_file(out / "model.safetensors"))

    result = fine_tune(_config(data, out), on_event=keep_probe_checkpoint)

    assert [row["phase"] for row in result.history] == ["probe"]  # no fine-tuning
    studio = json.loads((out / "config.json").read_text())["studio"]
    assert studio["plan"]["probe_only"] is True
    assert f"< {FEW_SHOT_PER_CLASS}" in studio["plan"]["reason"]
    num_train, num_val = studio["dataset"]["num_train"], studio["dataset"]["num_val"]
    refit = studio["probe_refit"]
    assert (refit["train_images"], refit["val_images"]) == (num_train, num_val)
    assert refit["c"] in C_GRID
    # the temperature belongs to the refitted head: fitted on its out-of-fold logits over all 30 images
    assert "out-of-fold" in studio["calibration"]["fitted_on"] and studio["calibration"]["n_images"] == 30
    assert num_train + num_val == 30
    final = load_file(out / "model.safetensors")
    # the backbone is the probe's; only the head changed, refitted on more images
    assert all(torch.equal(final[key], probe_weights[key]) for key in final if key not in HEAD)
    assert not torch.allclose(final["classifier.weight"], probe_weights["classifier.weight"])
    # the held-out scores are the probe's (validation chose nothing it then trained on)
    assert studio["metrics"]["strategy_used"] == "linear"
    assert "refitted on all" in (out / "README.md").read_text()
    with caplog.at_level(logging.WARNING):
        evaluated, _, _ = evaluate_folder(data, str(out))
    assert evaluated["subset"] == "val"
    assert "in-sample" in caplog.text


def test_explicit_epochs_or_more_images_per_class_still_fine_tune(tmp_path: Path) -> None:
    few = write_digits_folder(tmp_path / "few", classes=(0, 1), per_class=10)
    asked = fine_tune(_config(few, tmp_path / "asked", epochs=1))
    assert [row["phase"] for row in asked.history] == ["probe", "finetune"]
    studio = json.loads((tmp_path / "asked" / "config.json").read_text())["studio"]
    assert studio["plan"]["probe_only"] is False and "probe_refit" not in studio
    assert "probe only" not in studio["plan"]["reason"]

    more = write_digits_folder(tmp_path / "more", classes=(0, 1), per_class=40)
    auto = fine_tune(_config(more, tmp_path / "auto", time_budget_s=120))
    assert "finetune" in [row["phase"] for row in auto.history]


def test_the_few_shot_head_is_scikit_learns_logistic_regression_at_the_chosen_c() -> None:
    """Real digits (8x8 pixels), 10 per class: the same loss as LogisticRegression(C), C from C_GRID by
    k-fold, and per-image weights that favour a class raise its predictions."""
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from finetune.probe_refit import fit_few_shot_head

    digits = load_digits()
    pixels, labels = digits.data / 16.0, digits.target
    chosen = np.concatenate([np.flatnonzero(labels == c)[:10] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(labels)), chosen)
    features, targets = torch.from_numpy(pixels[chosen]).float(), torch.from_numpy(labels[chosen])
    head = fit_few_shot_head(features, targets, 10)
    assert head.c in C_GRID and 0.5 < head.cv_top1 <= 1.0
    assert head.oof_logits.shape == (100, 10)
    assert head.cv_top1 == pytest.approx(float((head.oof_logits.argmax(1) == labels[chosen]).mean()))
    ours = (torch.from_numpy(pixels[rest]).float() @ head.weight.T + head.bias).argmax(1).numpy()
    reference = LogisticRegression(C=head.c, max_iter=5000).fit(pixels[chosen], labels[chosen])
    theirs = reference.predict(pixels[rest])
    assert (ours == theirs).mean() > 0.97
    assert (ours == labels[rest]).mean() > 0.7  # 78.6% measured

    favour_three = torch.where(targets == 3, 20.0, 1.0)
    weighted = fit_few_shot_head(features, targets, 10, favour_three)
    threes = (torch.from_numpy(pixels[rest]).float() @ weighted.weight.T + weighted.bias).argmax(1)
    assert int((threes == 3).sum()) > int((torch.from_numpy(ours) == 3).sum())
