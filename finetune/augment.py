"""Batch augmentation on cached uint8 tensors: mild, domain-safe and seeded.

timm's default training transform (random-resized crops down to 8% of the image, horizontal flips) destroys
digits, text and many product or part photos. Ours keeps the whole object: small rotations, scale and shifts,
brightness and contrast jitter, flips only when asked. It runs on whole batches (one `grid_sample`), so it
costs little next to the model, and it draws from a seeded generator so a resumed run repeats the same epochs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812 (the usual PyTorch alias)

MAX_ROTATION_DEG = 10.0
MAX_SCALE_CHANGE = 0.10
MAX_SHIFT = 0.06  # fraction of the image size
MAX_BRIGHTNESS = 0.15
MAX_CONTRAST = 0.15


def normalize(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float normalized with the model's mean/std (as the eval transform does)."""
    return _standardize(pixels.float().div_(255.0), mean, std)


def _standardize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t = torch.tensor(mean, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def augment(
    pixels: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    generator: torch.Generator,
    hflip: bool = False,
    jitter: bool = True,
) -> torch.Tensor:
    """Random affine + photometric jitter of a uint8 batch, returned normalized like `normalize`.

    With `jitter` off the images stay as they are, except for the random flips `hflip` asks for.
    """
    count = pixels.shape[0]
    if not jitter:
        if hflip:
            flipped = torch.rand(count, generator=generator) < 0.5
            pixels = torch.where(flipped.view(-1, 1, 1, 1).to(pixels.device), pixels.flip(-1), pixels)
        return normalize(pixels, mean, std)

    def uniform(limit: float) -> torch.Tensor:
        return (torch.rand(count, generator=generator) * 2 - 1) * limit

    angle = uniform(math.radians(MAX_ROTATION_DEG))
    scale = 1 + uniform(MAX_SCALE_CHANGE)
    shift_x, shift_y = uniform(MAX_SHIFT) * 2, uniform(MAX_SHIFT) * 2  # affine_grid spans [-1, 1]
    brightness = 1 + uniform(MAX_BRIGHTNESS)
    contrast = 1 + uniform(MAX_CONTRAST)
    flip = (
        torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0) if hflip else torch.ones(count)
    )

    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [torch.stack([cos * flip, -sin, shift_x], dim=1), torch.stack([sin * flip, cos, shift_y], dim=1)],
        dim=1,
    ).to(pixels.device)
    images = pixels.float().div_(255.0)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    mean_level = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean_level) * contrast.view(-1, 1, 1, 1).to(images.device) + mean_level
    images = (images * brightness.view(-1, 1, 1, 1).to(images.device)).clamp_(0.0, 1.0)
    return _standardize(images, mean, std)
