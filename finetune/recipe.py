"""`plan_recipe()`: how much of the backbone `auto` trains, and at what resolution, decided from the data.

One fixed compromise (half the backbone frozen, small images at twice their size with a 96 px floor) lost to
a plain full fine-tune at 128 px and to a 224 px linear probe on data unlike digits (issue 20). Measured with
`bench/recipe.py` (tf_efficientnet_lite0, 2 shared CPU cores, one seed, so timings are noisy):

- Few-shot Fashion-MNIST (10 images per class, 28 px): the default's probe at 96 px gave 66.8% held-out
  top-1; the same run at 224 px with nothing frozen gave 75.6% (a 224 px probe on all 100 images: 77.8%).
  With a few hundred images the native resolution costs seconds an epoch, and its features are stronger.
- Digits (64 px, ~1,000 training images, 128 px): training the whole backbone ran at 7-12 img/s on the
  shared cores (about 10 minutes for 6 epochs, against a 120 s target), so with many images the first half
  stays frozen, as before: it doubles training speed on CPU (lite0 at 224 px: 22 -> 42 img/s).
  With it, digits seed 0 gave 99.26% (148 s, ~104 img/s when the cores were free); the 224 px probe 95.7%.
- Faces vs non-faces (25 px, 140 images): 100% at 96 px and at 224 px, as the probe and the plain loop.
- Many tiny images (Fashion-MNIST, 48,000 training images of 28 px at 64 px, a 20-minute budget, official
  test; bench/fashion_mnist.py, idle machine): first half frozen 91.70% (3.3 epochs, validation levelled
  off at 92.1%); nothing frozen 92.23% in 2.2 epochs (bf16 steps), 92.41% in 3.3 (fp32 steps, 190 img/s:
  finetune/precision.py `training_precision`). At WHOLE_BACKBONE_MAX_PX and below a whole-backbone step is
  cheap, and images this far from ImageNet need their early layers adapted, so nothing is frozen there.

Few-shot data (a handful of images per class) keeps the probe. With 10 or 20 images per class, 2 or 4 per
class are left for validation: 20 validation images move 5 points per image, so validation cannot tell
fine-tuning from the probe, and fine-tuning lost on held-out data in every measured run (Fashion-MNIST,
500 test images, seeds 0-2, idle machine; the benchmark's probe on all images: 77.8 / 76.4 / 76.6% at 10 per
class, 75.0 / 76.4 / 81.8% at 20):

  10/class, lr 1e-3: 75.6, (probe kept) 74.0, 75.4% | lr 3e-4: 77.4, 71.0, (probe) 75.4% |
  lr 1e-4: 74.0, 74.2, (probe) 75.4% | 20/class, lr 1e-3: (probe) 74.8 vs the probe's 75.0, 73.4 vs 76.4%

So below FEW_SHOT_PER_CLASS training images per class (median), `auto` fits the probe only, and refits its
head on training + validation features at the end (finetune/run_finish.py `_refit_probe`, L2 strength by
k-fold: finetune/probe_refit.py): every image counts, and the held-out figures are those of the head fitted
on training images alone. The default then scored 78.0 / 76.4 / 77.2% (10 per class) and 75.2 / 76.4 / 81.8%
(20 per class), in 22-28 s: at or above the probe on all six.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from finetune.data import Sample, suggest_image_size

FEW_IMAGES = 400  # at or below this many training images, native resolution and a full fine-tune are cheap
FREEZE_HALF = -1  # TrainConfig.frozen_groups value meaning "the first half of the layer groups"
FEW_SHOT_PER_CLASS = 24  # below this median of training images per class, `auto` keeps the probe (above)
WHOLE_BACKBONE_MAX_PX = 64  # at or below this training size the whole backbone is trained (above)
AS_IS_MIN_IMAGES = 20_000  # from this many training images, seen at most AS_IS_MAX_EPOCHS times each,
AS_IS_MAX_EPOCHS = 6  # `auto` trains on the images as they are (plan_jitter)


@dataclass(frozen=True)
class RecipePlan:
    """What `auto` chose, and why (saved in config.json under studio.plan)."""

    image_size: int
    frozen_groups: int  # leading layer groups kept frozen; FREEZE_HALF = the first half
    reason: str
    probe_only: bool = False  # few-shot: validation cannot choose, `auto` keeps (and refits) the probe


def plan_recipe(
    train: Sequence[Sample],
    native_size: int,
    img_size: int = 0,
    frozen_groups: int = FREEZE_HALF,
    linear_probe: bool = False,
) -> RecipePlan:
    """Resolution and frozen groups for `train`; explicit `img_size` / `frozen_groups` (>= 0) are kept.

    Few images: native resolution, whole backbone trained (cheap, and the strongest features). Otherwise
    small images train at about twice their size and photos at native size (`suggest_image_size`), with
    the first half of the backbone frozen for speed. Few-shot data (under FEW_SHOT_PER_CLASS images per
    class) sets `probe_only`; the trainer honours it only when `auto` chooses the epochs. A `linear_probe`
    run (--strategy linear) trains the head alone, and its reason says so rather than how fine-tuning would
    have frozen the backbone.
    """
    few = len(train) <= FEW_IMAGES
    if img_size:
        size, why = img_size, "size given"
    elif few:
        size, why = native_size, f"{len(train)} training images (<= {FEW_IMAGES}): native size"
    else:
        size = suggest_image_size(train, native_size)
        why = "native size for photos" if size == native_size else "about twice the size of small images"
    if linear_probe:
        frozen, how = frozen_groups, "backbone frozen, head trained alone (--strategy linear)"
    elif frozen_groups >= 0:
        frozen, how = frozen_groups, "frozen groups given"
    elif few:
        frozen, how = 0, "whole backbone trained (cheap with few images)"
    elif size <= WHOLE_BACKBONE_MAX_PX:
        frozen, how = (
            0,
            f"whole backbone trained (cheap at {size} px, and tiny images need their early layers)",
        )
    else:
        frozen, how = FREEZE_HALF, "first half frozen (speed)"
    per_class = _median_per_class(train)
    if per_class < FEW_SHOT_PER_CLASS:
        few_shot = f"probe only ({per_class:g} training images per class < {FEW_SHOT_PER_CLASS})"
        reason = f"{size} px: {why}; {how}; {few_shot}"
        return RecipePlan(size, frozen, reason, probe_only=True)
    return RecipePlan(size, frozen, f"{size} px: {why}; {how}")


def _median_per_class(train: Sequence[Sample]) -> float:
    counts = Counter(sample.target for sample in train)
    return float(statistics.median(counts.values())) if counts else 0.0


def plan_jitter(
    requested: str, num_train: int, epochs: int, multilabel_cached_trunk: bool = False
) -> tuple[bool, str]:
    """Whether training batches get the mild affine + photometric jitter of finetune/augment.py, and why.

    Jitter invents the variety a small set lacks, at a price: each distorted view is a less typical example,
    so an update teaches less about the images as they are. A large set seen a few times has variety of its
    own and is not memorized (Fashion-MNIST, 48,000 training images: with jitter, training accuracy was
    still level with validation after 4 epochs), so there the price buys nothing. At a fixed 2 epochs on
    it (same split, seed and probe), validation top-1 went from 92.18% to 93.09% and the official test
    from 91.81% to 92.69% without jitter. `epochs` is how often the run means to see each image (--epochs,
    or what `auto` wants before the time budget cuts it); flips (--hflip) are a separate choice and apply
    either way.

    Jitter has a second price when the first layers are frozen: without it they run once per image instead
    of once per step (finetune/trunk_cache.py), which doubles a CPU's epochs at 224 px. A multi-label run
    whose frozen layers can be cached (`multilabel_cached_trunk`) spends that on more epochs, and keeps the
    jitter's shift by moving the cached activations (`shifts_cached_activations`; measured in
    finetune/multilabel_train.py).
    """
    if requested != "auto":
        return requested == "on", f"--augment {requested}"
    if shifts_cached_activations(requested, multilabel_cached_trunk):
        return False, "multi-label, frozen first layers: their activations are cached and shifted at random"
    if num_train >= AS_IS_MIN_IMAGES and epochs <= AS_IS_MAX_EPOCHS:
        return False, f"{num_train} training images seen at most {epochs} times: trained as they are"
    return True, "mild jitter (rotation, scale, shift, brightness, contrast) for variety"


def shifts_cached_activations(requested: str, multilabel_cached_trunk: bool) -> bool:
    """Whether training moves the frozen layers' cached activations at random (finetune/trunk_cache.py
    `shift_maps`): for multi-label runs under --augment auto, in place of the pixel jitter (`plan_jitter`)."""
    return requested == "auto" and multilabel_cached_trunk
