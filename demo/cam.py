"""Grad-CAM for timm classifiers: the layer to explain per architecture, how to read it, the heatmaps.

`CAM_LAYERS` is the one table from architecture family (the timm model class) to the layer Grad-CAM weighs
and the layout of that layer's output, in the spirit of fastai's `model_meta`. Token models (ViT, DeiT,
EVA, ...) are reshaped to a grid read from the model itself (`patch_embed.grid_size`, or the grid for the
actual input size when the model takes any size, and `num_prefix_tokens`), never from constants, so one
code path serves every patch size, resolution and number of class/register tokens.

The multi-scale view runs Grad-CAM on the same crop at several input sizes and averages the maps: small
scales see the object whole, large scales give a finer grid, and what persists across scales is what the
model relies on.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 (the universal alias)
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.image import show_cam_on_image
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from finetune.errors import ConfigError
from finetune.modeling import split_eval_transform

NCHW, NHWC, TOKENS = "nchw", "nhwc", "tokens"

# timm model class -> (target layer path, layout of its output). "-1" indexes the last child of a sequence.
CAM_LAYERS: dict[str, tuple[str, str]] = {
    "EfficientNet": ("bn2", NCHW),  # conv_head + bn2: the last map before global pooling
    "MobileNetV3": ("blocks.-1", NCHW),  # its conv_head runs after pooling, so the last block is the last map
    "ResNet": ("layer4", NCHW),
    "ConvNeXt": ("stages.-1", NCHW),
    "RegNet": ("s4", NCHW),
    "DenseNet": ("features", NCHW),
    "VisionTransformer": ("blocks.-1.norm1", TOKENS),  # the choice of grad-cam's README for ViT
    "VisionTransformerDistilled": ("blocks.-1.norm1", TOKENS),
    "Eva": ("blocks.-1.norm1", TOKENS),
    "SwinTransformer": ("layers.-1.blocks.-1.norm1", NHWC),
}
MULTI_SCALES = (0.75, 1.0, 1.5, 2.0)  # relative to the run's input size; 1.0 is the single-scale view
VIEW_MIN_SIDE = 448  # overlays are drawn on the model's crop rendered at least this large


@dataclass(frozen=True)
class CamTarget:
    """The layer Grad-CAM hooks, the layout of its output and, for tokens, how to make it a BCHW map."""

    layer: torch.nn.Module
    layout: str
    path: str


def find_cam_target(model: torch.nn.Module) -> CamTarget:
    """The layer to explain: from `CAM_LAYERS`, else the last transformer block, else timm's last feature."""
    family = type(model).__name__
    if family in CAM_LAYERS:
        path, layout = CAM_LAYERS[family]
    elif is_token_model(model) and hasattr(model, "blocks"):
        path, layout = "blocks.-1.norm1", TOKENS
    elif getattr(model, "feature_info", None):
        path, layout = model.feature_info[-1]["module"], NCHW
    else:
        raise ConfigError(
            f"no Grad-CAM layer known for {family}; add its last spatial layer to CAM_LAYERS in demo/cam.py."
        )
    return CamTarget(layer=get_layer(model, path), layout=layout, path=path)


def get_layer(model: torch.nn.Module, path: str) -> torch.nn.Module:
    """`model.get_submodule` that also accepts negative indices ("blocks.-1") into sequences."""
    module = model
    for part in path.split("."):
        is_index = part.lstrip("-").isdigit()
        module = list(module.children())[int(part)] if is_index else getattr(module, part)
    return module


def is_token_model(model: torch.nn.Module) -> bool:
    """ViT-style models: a patch embedding and prefix (class, register) tokens in front of the patches."""
    return hasattr(model, "patch_embed") and hasattr(model, "num_prefix_tokens")


def token_grid(model: torch.nn.Module, input_hw: tuple[int, int]) -> tuple[int, int]:
    """Patch grid for an input of `input_hw`: the model's fixed grid, or the one for this size if dynamic."""
    if getattr(model, "dynamic_img_size", False):
        return tuple(model.patch_embed.dynamic_feat_size(input_hw))
    return tuple(model.patch_embed.grid_size)


def make_reshape(model: torch.nn.Module, layout: str, input_hw: tuple[int, int]) -> Callable | None:
    """The `reshape_transform` grad-cam needs to see a BCHW map (None for layers that already give one)."""
    if layout == NCHW:
        return None
    if layout == NHWC:
        return lambda tensor: tensor.permute(0, 3, 1, 2)
    grid_h, grid_w = token_grid(model, input_hw)
    prefix = int(model.num_prefix_tokens)

    def tokens_to_map(tensor: torch.Tensor) -> torch.Tensor:
        patches = tensor[:, prefix:, :]
        if patches.shape[1] != grid_h * grid_w:
            raise RuntimeError(f"{patches.shape[1]} patch tokens do not fill a {grid_h}x{grid_w} grid")
        return patches.reshape(tensor.shape[0], grid_h, grid_w, tensor.shape[-1]).permute(0, 3, 1, 2)

    return tokens_to_map


def prepare_cam_model(model: torch.nn.Module) -> torch.nn.Module:
    """A private copy for Grad-CAM: its hooks and resizing never touch the model that serves predictions.

    Parameters need no gradients (the input carries them), which saves the weight-gradient work.
    """
    cam_model = copy.deepcopy(model).eval()
    cam_model.requires_grad_(False)
    return cam_model


def compute_cam(model: torch.nn.Module, input_tensor: torch.Tensor, class_index: int) -> np.ndarray:
    """Grad-CAM map (H, W) in [0, 1] of `class_index` for one preprocessed image (1, C, H, W)."""
    target = find_cam_target(model)
    input_hw = (int(input_tensor.shape[-2]), int(input_tensor.shape[-1]))
    reshape = make_reshape(model, target.layout, input_hw)
    with GradCAM(model=model, target_layers=[target.layer], reshape_transform=reshape) as cam:
        maps = cam(
            input_tensor=input_tensor.detach().clone().requires_grad_(True),
            targets=[ClassifierOutputTarget(int(class_index))],
        )
    return maps[0].astype(np.float32)


def compute_cams(
    model: torch.nn.Module,
    input_tensor: torch.Tensor,
    class_index: int,
    scales: Sequence[float] = MULTI_SCALES,
) -> dict[float, np.ndarray]:
    """Grad-CAM at each input scale the model can take, every map resized back to the input's (H, W).

    Scale 1.0 is always included. The input is the run's own transform output; other scales resize that
    tensor (already normalized), so every scale shares the same crop and normalization. A scale that
    rounds to a size already used (small inputs, large strides) is left out rather than counted twice.
    """
    base_hw = (int(input_tensor.shape[-2]), int(input_tensor.shape[-1]))
    stride = _stride(model)
    wanted = [1.0, *sorted(set(scales) - {1.0})] if supports_multiscale(model) else [1.0]
    cams: dict[float, np.ndarray] = {}
    sizes_done: set[tuple[int, int]] = set()
    for scale in wanted:
        size = _scaled_size(base_hw, scale, stride)
        if size in sizes_done:
            continue
        sizes_done.add(size)
        resized = size != base_hw
        scaled = (
            F.interpolate(input_tensor, size=size, mode="bilinear", antialias=True)
            if resized
            else input_tensor
        )
        with _input_size(model, size):
            cam = compute_cam(model, scaled, class_index)
        cams[scale] = _resize_map(cam, base_hw)
    return dict(sorted(cams.items()))


def fuse_cams(cams: dict[float, np.ndarray]) -> np.ndarray:
    """Mean of per-scale maps, rescaled to [0, 1] (each map already is, so no scale dominates)."""
    fused = np.mean(np.stack(list(cams.values())), axis=0)
    low, high = float(fused.min()), float(fused.max())
    return ((fused - low) / (high - low) if high > low else np.zeros_like(fused)).astype(np.float32)


def supports_multiscale(model: torch.nn.Module) -> bool:
    """CNNs take any size; token models when dynamic or resizable (timm's `set_input_size`)."""
    target = find_cam_target(model)
    if target.layout == NCHW:
        return True
    if target.layout == TOKENS:
        return bool(getattr(model, "dynamic_img_size", False)) or hasattr(model, "set_input_size")
    return False  # windowed models (Swin) tie their input size to window sizes: explain at the native size


def model_view(image: Image.Image, data_config: dict[str, Any], min_side: int = VIEW_MIN_SIDE) -> Image.Image:
    """The crop the model sees (same resize and crop as the run's eval transform), rendered for display."""
    _, height, width = data_config["input_size"]
    factor = view_scale(data_config, min_side)
    display = {**data_config, "input_size": [3, round(height * factor), round(width * factor)]}
    geometric, _, _ = split_eval_transform(display)
    return geometric(image)


def view_scale(data_config: dict[str, Any], min_side: int = VIEW_MIN_SIDE) -> float:
    """How much larger than the model's input the displayed view is drawn."""
    _, height, width = data_config["input_size"]
    return max(1.0, min_side / min(height, width))


def overlay(view: Image.Image, cam: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """Jet heatmap of `cam` blended over `view`: opacity 0 shows the photo only, 1 the heatmap only."""
    opacity = float(np.clip(opacity, 0.0, 1.0))
    mask = np.clip(_resize_map(cam, (view.height, view.width)), 0.0, 1.0)
    pixels = np.asarray(view.convert("RGB"), dtype=np.float32) / 255.0
    return Image.fromarray(show_cam_on_image(pixels, mask, use_rgb=True, image_weight=1.0 - opacity))


def _resize_map(cam: np.ndarray, size_hw: tuple[int, int]) -> np.ndarray:
    if cam.shape == tuple(size_hw):
        return cam
    resized = Image.fromarray(cam.astype(np.float32)).resize((size_hw[1], size_hw[0]), Image.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def _scaled_size(base_hw: tuple[int, int], scale: float, stride: int) -> tuple[int, int]:
    """`base_hw` times `scale` in multiples of `stride`; the base size itself at scale 1."""
    if scale == 1.0:
        return base_hw
    height, width = (max(stride, round(side * scale / stride) * stride) for side in base_hw)
    return height, width


def _stride(model: torch.nn.Module) -> int:
    """Input sizes are kept multiples of the patch size (tokens) or of the network's total stride (CNNs)."""
    if is_token_model(model):
        return int(model.patch_embed.patch_size[0])
    info = getattr(model, "feature_info", None)
    return int(info[-1]["reduction"]) if info else 32


@contextmanager
def _input_size(model: torch.nn.Module, size_hw: tuple[int, int]) -> Iterator[None]:
    """Let a fixed-size token model take `size_hw` for a moment, then restore it exactly.

    timm's `set_input_size` resamples the position embedding; resampling back is lossy, so the original
    embedding is saved and copied back afterwards.
    """
    needs_resize = (
        is_token_model(model)
        and not getattr(model, "dynamic_img_size", False)
        and tuple(model.patch_embed.img_size) != tuple(size_hw)
    )
    if not needs_resize:
        yield
        return
    native = tuple(model.patch_embed.img_size)
    saved = model.pos_embed.detach().clone() if getattr(model, "pos_embed", None) is not None else None
    model.set_input_size(img_size=size_hw)
    try:
        yield
    finally:
        model.set_input_size(img_size=native)
        if saved is not None:
            with torch.no_grad():
                model.pos_embed.copy_(saved)
