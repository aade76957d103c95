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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from finetune.data import Sample, suggest_image_size

FEW_IMAGES = 400  # at or below this many training images, native resolution and a full fine-tune are cheap
FREEZE_HALF = -1  # TrainConfig.frozen_groups value meaning "the first half of the layer groups"


@dataclass(frozen=True)
class RecipePlan:
    """What `auto` chose, and why (saved in config.json under studio.plan)."""

    image_size: int
    frozen_groups: int  # leading layer groups kept frozen; FREEZE_HALF = the first half
    reason: str


def plan_recipe(
    train: Sequence[Sample], native_size: int, img_size: int = 0, frozen_groups: int = FREEZE_HALF
) -> RecipePlan:
    """Resolution and frozen groups for `train`; explicit `img_size` / `frozen_groups` (>= 0) are kept.

    Few images: native resolution, whole backbone trained (cheap, and the strongest features). Otherwise
    small images train at about twice their size and photos at native size (`suggest_image_size`), with
    the first half of the backbone frozen for speed.
    """
    few = len(train) <= FEW_IMAGES
    if img_size:
        size, why = img_size, "size given"
    elif few:
        size, why = native_size, f"{len(train)} training images (<= {FEW_IMAGES}): native size"
    else:
        size = suggest_image_size(train, native_size)
        why = "native size for photos" if size == native_size else "about twice the size of small images"
    if frozen_groups >= 0:
        frozen, how = frozen_groups, "frozen groups given"
    elif few:
        frozen, how = 0, "whole backbone trained (cheap with few images)"
    else:
        frozen, how = FREEZE_HALF, "first half frozen (speed)"
    return RecipePlan(size, frozen, f"{size} px: {why}; {how}")
