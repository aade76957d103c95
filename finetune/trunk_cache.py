"""The frozen first layers' activations, computed once per run instead of in every step of every epoch.

Fine-tuning usually keeps the first half of the backbone frozen (finetune/recipe.py). When the training
images are also used as they are (no jitter, no flips), that frozen trunk computes the same activations for
an image in every epoch, and on a CPU it is the costly half: on lite0 at 224 px in fp32 on 2 cores a
step ran at ~21 img/s, of which the frozen layers' forward pass took ~half. So the trunk runs once over the
training and validation images, its output is kept in a memory-mapped float16 `.npy` in the run's `.cache`
(the pixel cache's format: no RAM per image), and each step feeds those activations to the first trainable
module while the model itself runs on a one-image placeholder.

Where the network splits is found, not declared per architecture: `find_trunk` runs the model once and
takes the first module called whose weights all train. A forward pre-hook on it swaps in the cached
activations. The split is used only when, on real images, the hooked model reproduces the model's own
outputs; a network whose later layers read an earlier tensor directly (a long skip connection) fails that
check, and the run trains as before, computing the whole network in every step.

Cached activations cannot take the pixel jitter, but they can take its shift: `shift_maps` moves each map
by whole cells, which convolutions make (but at the edges) the activations of a shifted image. Multi-label
runs use it (finetune/recipe.py `shifts_cached_activations`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune.augment import MAX_SHIFT, normalize
from finetune.distributed import DistContext
from finetune.pixel_cache import CachedImages
from finetune.precision import Precision

logger = logging.getLogger(__name__)

CHECK_IMAGES = 4  # real images the split must reproduce the model's outputs on
CHECK_TOLERANCE = 1e-3  # largest difference allowed, relative to the outputs' largest magnitude (fp32)
FP16_MAX = 60000.0  # activations beyond this would overflow float16: such a model is not cut
TRUNK_CACHE_DIR = ".cache"  # under the run folder: these activations belong to one run's frozen weights
TRUNK_FILES = ("trunk_train.npy", "trunk_val.npy")


class _CapturedError(Exception):
    """Raised by the capturing hook: the trunk's output is in hand, the rest of the network need not run."""


@dataclass(frozen=True)
class Trunk:
    """Where a model splits into its frozen first layers and the trainable rest."""

    boundary: str  # qualified name of the first module (in call order) whose weights all train
    image_shape: tuple[int, int, int]  # (C, H, W) of the images the model is fed

    def module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The boundary module of `model`, a DDP wrapper of it, or an EMA copy of it."""
        return getattr(model, "module", model).get_submodule(self.boundary)

    def placeholder(self, device: torch.device) -> torch.Tensor:
        """The one image the model runs on while the boundary receives cached activations."""
        return torch.zeros((1, *self.image_shape), device=device).contiguous(
            memory_format=torch.channels_last
        )


def find_trunk(
    model: torch.nn.Module, pixels: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]
) -> Trunk | None:
    """The split of `model` (its frozen parameters already set), or None when it has no frozen trunk or the
    split does not reproduce the model's outputs on `pixels` (a few uint8 images)."""
    device = next(model.parameters()).device
    images = normalize(pixels.to(device), mean, std).contiguous(memory_format=torch.channels_last)
    boundary = _first_trainable_module(model, images[:1])
    if boundary is None:
        return None
    trunk = Trunk(boundary, tuple(images.shape[1:]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            expected = model(images).float()
            activations = _capture(model, trunk, images)
            with feeding(model, trunk, activations):
                fed = model(trunk.placeholder(images.device)).float()
    except Exception as error:  # noqa: BLE001 (any failure of the cut means: train without it)
        logger.info("The frozen layers cannot be cut at %s (%s): they run in every step.", boundary, error)
        return None
    finally:
        model.train(was_training)
    scale = float(expected.abs().max()) or 1.0
    if fed.shape != expected.shape or float((fed - expected).abs().max()) > CHECK_TOLERANCE * scale:
        logger.info(
            "The frozen layers cannot be cut at %s: the outputs differ; they run in every step.", boundary
        )
        return None
    return trunk


@contextlib.contextmanager
def feeding(model: torch.nn.Module, trunk: Trunk, activations: torch.Tensor) -> Iterator[None]:
    """While inside, the boundary of `model` takes `activations` as its input, whatever the model is fed."""

    def swap(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (activations, *args[1:])

    handle = trunk.module(model).register_forward_pre_hook(swap)
    try:
        yield
    finally:
        handle.remove()


class TrunkActivations:
    """The trunk's output for each image of one subset, rows in the subset's order."""

    def __init__(self, trunk: Trunk, array: np.ndarray, rows: np.ndarray | None = None) -> None:
        self.trunk, self.array = trunk, array
        self.rows = np.arange(len(array)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: torch.Tensor) -> TrunkActivations:
        """The activations of the images at `indices` (as `CachedImages.subset`)."""
        return TrunkActivations(self.trunk, self.array, self.rows[indices.numpy()])

    @contextlib.contextmanager
    def inputs(
        self,
        model: torch.nn.Module,
        index: torch.Tensor,
        device: torch.device,
        generator: torch.Generator | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields what to call `model` with for the images at `index`: the placeholder, while the boundary
        receives their cached activations (with a `generator`, each shifted at random: `shift_maps`)."""
        batch = torch.from_numpy(np.ascontiguousarray(self.array[self.rows[index.numpy()]]))
        activations = batch.to(device, dtype=torch.float32, non_blocking=True)
        if generator is not None and activations.ndim == 4:
            activations = shift_maps(activations, generator)
        if activations.ndim == 4:
            activations = activations.contiguous(memory_format=torch.channels_last)
        with feeding(model, self.trunk, activations):
            yield self.trunk.placeholder(device)


def shift_maps(maps: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each (C, H, W) map moved by whole cells, up to MAX_SHIFT of its size, its edges repeated.

    This is the jitter's shift where a cached run can still apply it: convolutions carry a shift through, so
    the activations of a shifted image are (but at the edges) the shifted activations. lite0's 14x14 map at
    224 px moves by up to one cell, 7% of the image (the pixel jitter: up to 6%); a map of under 9 cells a
    side does not move.
    """
    count, _, height, width = maps.shape
    reach = round(MAX_SHIFT * min(height, width))
    if reach == 0:
        return maps
    padded = torch.nn.functional.pad(maps, (reach, reach, reach, reach), mode="replicate")
    offsets = torch.randint(0, 2 * reach + 1, (count, 2), generator=generator)
    return torch.stack(
        [padded[i, :, dy : dy + height, dx : dx + width] for i, (dy, dx) in enumerate(offsets.tolist())]
    )


def compute_activations(
    model: torch.nn.Module,
    trunk: Trunk,
    data: CachedImages,
    path: Path,
    settings: ActivationSettings,
    on_step: Callable[[int, int], None] | None = None,
) -> TrunkActivations | None:
    """Run the frozen trunk once over `data` into the float16 `.npy` at `path`; None if it would overflow.

    Distributed, each process computes its share of every chunk and the shares are gathered; the node's
    first process writes the file, the others then open it.
    """
    s, dist = settings, settings.dist
    model.eval()
    count = len(data)
    if count == 0:
        return None
    chunk = s.batch_size * dist.world_size
    array = None
    if dist.is_local_main:
        path.parent.mkdir(parents=True, exist_ok=True)
    overflow = False
    steps = -(-count // chunk)
    for step, start in enumerate(range(0, count, chunk), start=1):
        rows = torch.arange(start, min(count, start + chunk))
        mine = rows[dist.share(len(rows))]
        pixels = data.pixels[mine].to(s.precision.device, non_blocking=True)
        images = normalize(pixels, s.mean, s.std).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), s.precision.autocast():
            captured = _capture(model, trunk, images).float().cpu()
        gathered = dist.all_gather_rows(captured.contiguous(), len(rows))
        overflow = (
            overflow or not bool(torch.isfinite(gathered).all()) or float(gathered.abs().max()) > FP16_MAX
        )
        if dist.is_local_main and not overflow:
            if array is None:
                array = np.lib.format.open_memmap(
                    path, mode="w+", dtype=np.float16, shape=(count, *gathered.shape[1:])
                )
            array[start : start + len(rows)] = gathered.numpy().astype(np.float16)
        if on_step is not None:
            on_step(step, steps)
    if overflow:
        path.unlink(missing_ok=True)
        logger.info("The frozen layers' activations exceed float16: they run in every step instead.")
        return None
    if array is not None:
        array.flush()
        del array
    dist.barrier()
    return TrunkActivations(trunk, np.load(path, mmap_mode="r"))


@dataclass(frozen=True)
class TrunkCache:
    """The trunk's activations of a run's training and validation images, and what computing them cost."""

    train: TrunkActivations
    val: TrunkActivations
    seconds_per_image: float  # per process: the frozen layers' share of a forward pass


@dataclass(frozen=True)
class ActivationSettings:
    """How `compute_activations` runs the trunk: the preprocessing, precision and processes of the run."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    precision: Precision
    dist: DistContext
    batch_size: int = 64


def _first_trainable_module(model: torch.nn.Module, image: torch.Tensor) -> str | None:
    """The first module called (one forward pass on `image`) whose parameters all train, when some frozen
    parameter is called before it; None otherwise."""
    if not any(not p.requires_grad for p in model.parameters()):
        return None
    order: list[str] = []
    handles = [
        module.register_forward_pre_hook(lambda m, args, name=name: order.append(name))
        for name, module in model.named_modules()
        if name
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(image)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    seen, frozen_before = set(), False
    for name in order:
        if name in seen:
            continue
        seen.add(name)
        params = list(model.get_submodule(name).parameters())
        if params and all(p.requires_grad for p in params):
            return name if frozen_before else None
        frozen_before = frozen_before or any(not p.requires_grad for p in params)
    return None


def _capture(model: torch.nn.Module, trunk: Trunk, images: torch.Tensor) -> torch.Tensor:
    """The boundary's input for `images`: the trunk runs, the rest of the network does not."""
    captured: list[torch.Tensor] = []

    def grab(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        captured.append(args[0])
        raise _CapturedError

    handle = trunk.module(model).register_forward_pre_hook(grab)
    try:
        model(images)
    except _CapturedError:
        pass
    finally:
        handle.remove()
    if not captured or not isinstance(captured[0], torch.Tensor):
        raise ValueError("the first trainable module does not take one tensor")
    return captured[0]
