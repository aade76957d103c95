"""The recipe planner picks what finetune/recipe.py's rule says, from real image files (no training)."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from finetune.data import Sample
from finetune.recipe import (
    AS_IS_MAX_EPOCHS,
    AS_IS_MIN_IMAGES,
    FEW_IMAGES,
    FEW_SHOT_PER_CLASS,
    FREEZE_HALF,
    WHOLE_BACKBONE_MAX_PX,
    plan_jitter,
    plan_recipe,
    shifts_cached_activations,
)


def _samples(tmp_path: Path, side: int, count: int) -> list[Sample]:
    """`count` samples over two real files of `side` px (the planner reads headers, not every file)."""
    paths = []
    for index in range(2):
        path = tmp_path / f"{side}_{index}.png"
        Image.new("RGB", (side, side), (index * 200, 50, 50)).save(path)
        paths.append(path)
    return [Sample(paths[i % 2], i % 2) for i in range(count)]


def test_many_small_images_train_at_twice_their_size_with_the_first_half_frozen(tmp_path: Path) -> None:
    plan = plan_recipe(_samples(tmp_path, 64, FEW_IMAGES + 600), native_size=224)
    assert (plan.image_size, plan.frozen_groups) == (128, FREEZE_HALF)


def test_many_tiny_images_train_at_64_px_not_96_with_nothing_frozen(tmp_path: Path) -> None:
    """28 px images (Fashion-MNIST) at twice their size: 64 px (2.25x the updates of 96 px), where a step
    through the whole backbone is cheap and beat a half-frozen one at the same budget."""
    plan = plan_recipe(_samples(tmp_path, 28, FEW_IMAGES + 600), native_size=224)
    assert (plan.image_size, plan.frozen_groups) == (64, 0)
    assert "whole backbone" in plan.reason
    assert (
        plan_recipe(
            _samples(tmp_path, 28, FEW_IMAGES + 600), 224, img_size=WHOLE_BACKBONE_MAX_PX + 32
        ).frozen_groups
        == FREEZE_HALF
    )


def test_many_photos_train_at_native_size_with_the_first_half_frozen(tmp_path: Path) -> None:
    plan = plan_recipe(_samples(tmp_path, 400, FEW_IMAGES + 600), native_size=224)
    assert (plan.image_size, plan.frozen_groups) == (224, FREEZE_HALF)


def test_few_small_images_train_at_native_size_with_nothing_frozen(tmp_path: Path) -> None:
    plan = plan_recipe(_samples(tmp_path, 28, 80), native_size=224)
    assert (plan.image_size, plan.frozen_groups) == (224, 0)
    assert "80 training images" in plan.reason


def test_explicit_size_and_frozen_groups_are_kept(tmp_path: Path) -> None:
    samples = _samples(tmp_path, 28, 80)
    assert plan_recipe(samples, 224, img_size=96, frozen_groups=3).image_size == 96
    assert plan_recipe(samples, 224, img_size=96, frozen_groups=3).frozen_groups == 3
    # an explicit size for few images still trains everything; for many, the first half stays frozen
    assert plan_recipe(samples, 224, img_size=96).frozen_groups == 0
    assert plan_recipe(_samples(tmp_path, 400, FEW_IMAGES + 1), 224, img_size=96).frozen_groups == FREEZE_HALF


def test_few_shot_data_keeps_the_probe_and_more_images_per_class_do_not(tmp_path: Path) -> None:
    """Two classes: under FEW_SHOT_PER_CLASS images each, validation cannot choose (see recipe.py)."""
    few = plan_recipe(_samples(tmp_path, 28, 2 * (FEW_SHOT_PER_CLASS - 1)), native_size=224)
    assert few.probe_only and "probe only" in few.reason
    assert not plan_recipe(_samples(tmp_path, 28, 2 * FEW_SHOT_PER_CLASS), native_size=224).probe_only


def test_large_sets_seen_a_few_times_train_as_they_are_and_small_or_long_runs_keep_the_jitter() -> None:
    assert plan_jitter("auto", 48_000, 6)[0] is False  # Fashion-MNIST under auto
    assert plan_jitter("auto", AS_IS_MIN_IMAGES, AS_IS_MAX_EPOCHS)[0] is False
    assert plan_jitter("auto", AS_IS_MIN_IMAGES - 1, 6)[0] is True  # fewer images: variety is what they lack
    assert (
        plan_jitter("auto", 48_000, AS_IS_MAX_EPOCHS + 1)[0] is True
    )  # --epochs 7+: seen often enough to memorize
    assert plan_jitter("auto", 1_200, 12)[0] is True  # digits
    assert plan_jitter("on", 48_000, 2) == (True, "--augment on")
    assert plan_jitter("off", 500, 30) == (False, "--augment off")


def test_multi_label_runs_whose_frozen_layers_are_cached_train_as_they_are() -> None:
    assert plan_jitter("auto", 2_400, 8, multilabel_cached_trunk=True)[0] is False
    assert plan_jitter("auto", 2_400, 8, multilabel_cached_trunk=False)[0] is True  # no speed to buy
    assert plan_jitter("on", 2_400, 8, multilabel_cached_trunk=True) == (True, "--augment on")
    assert shifts_cached_activations("auto", multilabel_cached_trunk=True)
    assert not shifts_cached_activations("off", multilabel_cached_trunk=True)  # as they are, as asked
    assert not shifts_cached_activations("auto", multilabel_cached_trunk=False)
