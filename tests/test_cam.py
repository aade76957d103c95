"""Grad-CAM: the layer table, token reshapes read from the model, multi-scale, overlays, localisation."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from conftest import photo
from PIL import Image

from demo.cam import (
    CAM_LAYERS,
    NCHW,
    TOKENS,
    compute_cam,
    compute_cams,
    find_cam_target,
    fuse_cams,
    get_layer,
    make_reshape,
    model_view,
    overlay,
    prepare_cam_model,
)
from finetune.checkpoint import load_default_run
from finetune.modeling import create_model_and_transforms, split_eval_transform


def tiny(name: str, **kwargs) -> torch.nn.Module:
    """A random-init timm test model prepared as the service prepares its Grad-CAM copy."""
    if kwargs:  # options create_model_and_transforms does not expose (fixed size, register tokens)
        return prepare_cam_model(timm.create_model(name, pretrained=False, num_classes=3, **kwargs))
    return prepare_cam_model(create_model_and_transforms(name, num_classes=3, weights="none").model)


@pytest.mark.parametrize(
    ("name", "family", "attribute"),
    [
        ("test_efficientnet", "EfficientNet", lambda m: m.bn2),
        ("test_resnet", "ResNet", lambda m: m.layer4),
        ("test_convnext", "ConvNeXt", lambda m: m.stages[-1]),
        ("test_vit", "VisionTransformer", lambda m: m.blocks[-1].norm1),
    ],
)
def test_layer_table_picks_the_last_spatial_layer_of_each_family(name, family, attribute) -> None:
    model = tiny(name)
    target = find_cam_target(model)
    assert type(model).__name__ == family and family in CAM_LAYERS
    assert target.layer is attribute(model)
    assert target.layout == (TOKENS if family == "VisionTransformer" else NCHW)


@pytest.mark.parametrize("name", ["test_efficientnet", "test_resnet", "test_convnext", "test_byobnet"])
def test_cnn_target_layer_outputs_the_final_feature_map(name: str) -> None:
    """What Grad-CAM weighs is the map the classifier pools: the layer's output is forward_features' output.

    test_byobnet is in no table entry: the fallback must find its last map too.
    """
    model = tiny(name)
    assert (type(model).__name__ in CAM_LAYERS) == (name != "test_byobnet")
    outputs: list[torch.Tensor] = []
    handle = find_cam_target(model).layer.register_forward_hook(lambda m, i, out: outputs.append(out))
    with torch.no_grad():
        final = model.forward_features(torch.randn(1, 3, 96, 96))
    handle.remove()
    assert len(outputs) == 1 and torch.equal(outputs[0], final)


def test_vit_target_layer_sees_every_patch_of_the_last_block() -> None:
    model = tiny("test_vit", img_size=(64, 96), reg_tokens=4, dynamic_img_size=False)
    outputs: list[torch.Tensor] = []
    target = find_cam_target(model)
    handle = target.layer.register_forward_hook(lambda m, i, out: outputs.append(out))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 96))
    handle.remove()
    assert len(outputs) == 1  # called once: inside the last block
    grid = make_reshape(model, target.layout, (64, 96))(outputs[0])
    assert tuple(grid.shape[-2:]) == tuple(model.patch_embed.grid_size) == (4, 6)


def test_unlisted_cnn_falls_back_to_timms_last_feature_module() -> None:
    model = tiny("test_byobnet")
    cam = compute_cam(model, torch.randn(1, 3, 96, 96), class_index=1)
    assert cam.shape == (96, 96)


def test_get_layer_accepts_negative_indices() -> None:
    model = tiny("test_vit")
    assert get_layer(model, "blocks.-1.norm1") is model.blocks[len(model.blocks) - 1].norm1
    assert get_layer(model, "blocks.0") is model.blocks[0]


def test_token_reshape_reads_grid_and_prefix_tokens_from_the_model() -> None:
    """A non-square input with 4 register tokens: 1 + 4 prefix tokens and a 4 x 6 grid, no constants."""
    model = tiny("test_vit", img_size=(64, 96), reg_tokens=4, dynamic_img_size=False)
    assert model.num_prefix_tokens == 5 and tuple(model.patch_embed.grid_size) == (4, 6)
    reshape = make_reshape(model, TOKENS, (64, 96))
    tokens = torch.arange(2 * (5 + 24) * 8, dtype=torch.float32).reshape(2, 5 + 24, 8)
    grid = reshape(tokens)
    assert grid.shape == (2, 8, 4, 6)
    assert torch.equal(grid[:, :, 0, 1], tokens[:, 5 + 1, :])  # prefix dropped, row-major patches
    with pytest.raises(RuntimeError, match="do not fill a 4x6 grid"):
        reshape(tokens[:, :-1, :])


def test_vit() -> None:
    """Grad-CAM on a ViT at its native size: a full-size map in [0, 1] from reshaped tokens."""
    model = tiny("test_vit", img_size=(64, 96), reg_tokens=4, dynamic_img_size=False)
    cam = compute_cam(model, torch.randn(1, 3, 64, 96), class_index=2)
    assert cam.shape == (64, 96)
    assert cam.min() >= 0.0 and cam.max() <= 1.0 and cam.max() > 0.0


def test_vit_multiscale_resizes_a_fixed_size_model_and_restores_it_exactly() -> None:
    model = tiny("test_vit", img_size=64, dynamic_img_size=False)
    position = model.pos_embed.detach().clone()
    cams = compute_cams(model, torch.randn(1, 3, 64, 64), class_index=0, scales=(0.5, 2.0))
    assert sorted(cams) == [0.5, 1.0, 2.0]
    assert all(cam.shape == (64, 64) for cam in cams.values())
    assert tuple(model.patch_embed.img_size) == (64, 64) and torch.equal(model.pos_embed, position)


def test_dynamic_vit_multiscale_uses_the_grid_of_each_input_size() -> None:
    model = tiny("test_vit", img_size=64, dynamic_img_size=True)
    cams = compute_cams(model, torch.randn(1, 3, 64, 64), class_index=0, scales=(2.0,))
    assert sorted(cams) == [1.0, 2.0]
    assert not np.allclose(cams[1.0], cams[2.0])  # an 8x8 grid and a 4x4 grid give different maps


def test_cnn_multiscale_maps_share_the_input_frame_and_fuse_into_zero_one() -> None:
    model = tiny("test_efficientnet")
    cams = compute_cams(model, torch.randn(1, 3, 96, 96), class_index=1, scales=(0.75, 1.5))
    assert sorted(cams) == [0.75, 1.0, 1.5]
    fused = fuse_cams(cams)
    assert fused.shape == (96, 96) and fused.min() == 0.0 and fused.max() == pytest.approx(1.0)
    # 0.75 x 64 rounds to 64 at a stride of 32: that scale would repeat 1.0, so it is left out.
    assert sorted(compute_cams(model, torch.randn(1, 3, 64, 64), class_index=1, scales=(0.75, 2.0))) == [
        1.0,
        2.0,
    ]


def test_model_view_is_the_crop_the_model_sees() -> None:
    data_config = {"input_size": [3, 64, 64], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.5] * 3}
    data_config.update(crop_pct=0.875, crop_mode="center")
    image = photo("chelsea")
    geometric, _, _ = split_eval_transform(data_config)
    assert np.array_equal(
        np.asarray(model_view(image, data_config, min_side=64)), np.asarray(geometric(image))
    )
    assert model_view(image, data_config, min_side=256).size == (256, 256)


def test_overlay_opacity_moves_from_the_photo_to_the_heatmap() -> None:
    view = photo("coffee").resize((128, 96))
    cam = np.tile(np.linspace(0.0, 1.0, 32, dtype=np.float32), (24, 1))
    distances = []
    for opacity in (0.0, 0.5, 1.0):
        blended = overlay(view, cam, opacity)
        assert blended.size == view.size and blended.mode == "RGB"
        distances.append(np.abs(np.asarray(blended, np.float32) - np.asarray(view, np.float32)).mean())
    assert distances[0] < 3.0 < distances[1] < distances[2]


def test_gradcam_of_the_embedded_model_finds_the_cat_and_the_coffee() -> None:
    """Real photos side by side (cat left, coffee right): each class's heat sits on its own half."""
    run = load_default_run()
    model = prepare_cam_model(run.model)
    halves = [photo(name).resize((300, 300)) for name in ("chelsea", "coffee")]
    pair = Image.new("RGB", (600, 300))
    pair.paste(halves[0], (0, 0))
    pair.paste(halves[1], (300, 0))
    input_tensor = run.transform(pair)[None]  # the center crop keeps both halves, split in the middle
    for label, side in (("tiger cat", 0), ("espresso", 1)):
        cams = compute_cams(model, input_tensor, run.labels.index(label), scales=(1.5,))
        for cam in (cams[1.0], fuse_cams(cams)):
            width = cam.shape[1] // 2
            own, other = (
                cam[:, side * width : (side + 1) * width],
                cam[:, (1 - side) * width : (2 - side) * width],
            )
            assert own.mean() > 2 * other.mean(), label
