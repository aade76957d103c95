"""THE run format: `save_run()` writes a run folder, `load_run()` is the only way to read one back.

A run folder is a timm folder (`timm.create_model("local-dir:RUN")` loads it with no code of ours):
`model.safetensors` holds the weights and `config.json` holds timm's keys (`architecture`, `num_classes`,
`label_names`, `pretrained_cfg`) plus ours (`schema_version`, `data_config`, `studio`: training config,
metrics, library versions, where the weights came from). The resumable training state lives beside it in
`train_state.safetensors` + `train_state.json`. Nothing here is ever unpickled, and every file is written
atomically (temporary file, then rename) so a crash never leaves half a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from finetune.errors import CheckpointError
from finetune.modeling import (
    DATA_CONFIG_KEYS,
    DEFAULT_MODEL,
    create_eval_transform,
    create_model_and_transforms,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
STATE_TENSORS_FILE = "train_state.safetensors"
STATE_META_FILE = "train_state.json"
HUB_PREFIX = "hf-hub:"
HUB_FILES = [CONFIG_FILE, WEIGHTS_FILE, "*.png", "*.json", "*.md", "*.txt", "*.csv", "*.onnx"]


@dataclass
class LoadedRun:
    """A model ready for inference with the exact preprocessing and labels it was trained with."""

    model: torch.nn.Module
    transform: Any  # PIL image -> normalized tensor (timm eval transform built from `data_config`)
    labels: list[str]
    data_config: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the whole config.json
    run_dir: Path | None = None  # None for models that live in no folder (the embedded default)

    @property
    def architecture(self) -> str:
        return self.config.get("architecture", type(self.model).__name__)

    @property
    def studio(self) -> dict[str, Any]:
        """Our own section of the config: train config, metrics, versions, weights source."""
        return self.config.get("studio", {})


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder and rename it over `path` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; run folders are shared (containers, Spaces)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, data: Any) -> None:
    """Atomically write pretty JSON (also used for metrics and reports in the run folder)."""
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n"))


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module behind DistributedDataParallel or torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


def save_run(
    run_dir: Path,
    model: torch.nn.Module,
    labels: list[str],
    data_config: dict[str, Any],
    studio: dict[str, Any] | None = None,
) -> None:
    """Write `model.safetensors` and a timm-compatible `config.json` into `run_dir`, each atomically."""
    from timm.models._hub import save_config_for_hf

    model = unwrap_model(model)
    if len(labels) != model.num_classes:
        raise CheckpointError(f"{len(labels)} labels for a model with {model.num_classes} outputs.")
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in model.state_dict().items()}
    data_config = {key: data_config[key] for key in DATA_CONFIG_KEYS if key in data_config}
    extra = {"schema_version": SCHEMA_VERSION, "data_config": data_config, "studio": studio or {}}
    model_config = {"label_names": list(labels), **extra}
    atomic_write(run_dir / WEIGHTS_FILE, lambda tmp: save_file(tensors, str(tmp), metadata={"format": "pt"}))
    atomic_write(
        run_dir / CONFIG_FILE,
        lambda tmp: save_config_for_hf(model, str(tmp), model_config=model_config, data_config=data_config),
    )


def read_run_config(run_dir: Path) -> dict[str, Any]:
    """Parse and validate `config.json` of a run or timm folder (without loading weights)."""
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).is_dir():
        raise CheckpointError(
            f"checkpoint '{run_dir}' is not a folder; pass a run folder written by finetune."
        )
    if not path.is_file():
        raise CheckpointError(
            f"'{run_dir}' has no {CONFIG_FILE}; it is not a run folder written by finetune."
        )
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error}); the run folder is damaged.") from error
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise CheckpointError(f"{path} has no 'architecture'; it is not a timm or finetune config.")
    version = config.get("schema_version", SCHEMA_VERSION)  # plain timm folders have none
    if version != SCHEMA_VERSION:
        raise CheckpointError(
            f"{path} has schema_version {version!r}, this version reads {SCHEMA_VERSION}; "
            "upgrade Image Recognition Studio or re-export the run."
        )
    return config


def resolve_run_dir(checkpoint: str | Path) -> Path:
    """A local run folder, or `hf-hub:USER/NAME` fetched into (or found in) the Hugging Face cache."""
    text = str(checkpoint)
    if not text.startswith(HUB_PREFIX):
        return Path(checkpoint)
    repo_id = text[len(HUB_PREFIX) :]
    try:
        from huggingface_hub import snapshot_download
    except ImportError as error:
        raise CheckpointError("`pip install huggingface_hub` to load hf-hub: checkpoints.") from error
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except Exception as online_error:  # offline or hub down: fall back to what the cache already has
        try:
            return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
        except Exception:
            raise CheckpointError(
                f"cannot fetch '{repo_id}' from the Hugging Face Hub and it is not in the local cache "
                f"({type(online_error).__name__}); go online once, or pass a local run folder."
            ) from online_error


def load_run(checkpoint: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """Rebuild a run's model (no download), load its weights strictly and return its eval transform."""
    run_dir = resolve_run_dir(checkpoint)
    config = read_run_config(run_dir)
    weights_path = run_dir / WEIGHTS_FILE
    if not weights_path.is_file():
        pickled = [name for name in ("pytorch_model.bin", "model.pth") if (run_dir / name).exists()]
        hint = f" ({pickled[0]} is a pickle and is never loaded)" if pickled else ""
        raise CheckpointError(f"'{run_dir}' has no {WEIGHTS_FILE}{hint}.")
    state_dict = read_safetensors(weights_path)
    pretrained_cfg = config.get("pretrained_cfg", {})
    num_classes = int(config.get("num_classes", pretrained_cfg.get("num_classes", 0)))
    model_args = dict(config.get("model_args", {}))
    model_args.pop("num_classes", None)
    try:
        model = timm.create_model(
            config["architecture"], pretrained=False, num_classes=num_classes, **model_args
        )
    except Exception as error:  # unknown architecture (newer timm?) or bad model_args
        raise CheckpointError(f"cannot build '{config['architecture']}' from {run_dir}: {error}") from error
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as error:
        raise CheckpointError(
            f"{weights_path} does not match {config['architecture']} with {num_classes} classes: "
            f"{str(error).splitlines()[0]}"
        ) from error
    model.to(device).eval()
    data_config = _data_config_of(config)
    return LoadedRun(
        model=model,
        transform=create_eval_transform(data_config),
        labels=label_names_of(config, num_classes),
        data_config=data_config,
        config=config,
        run_dir=run_dir,
    )


def load_default_run(device: str | torch.device = "cpu") -> LoadedRun:
    """The embedded ImageNet `tf_efficientnet_lite0` as a run, so every tool works before any fine-tuning.

    It lives in no folder (`run_dir` is None); its config carries the same keys a saved run has, so code
    that describes a run (architecture, weights source) needs no special case.
    """
    created = create_model_and_transforms(DEFAULT_MODEL, num_classes=1000)
    created.model.to(device).eval()
    labels = imagenet_labels()
    config = {
        "architecture": DEFAULT_MODEL,
        "num_classes": len(labels),
        "label_names": labels,
        "schema_version": SCHEMA_VERSION,
        "data_config": created.data_config,
        "studio": {"weights_source": created.weights_source},
    }
    return LoadedRun(
        model=created.model,
        transform=create_eval_transform(created.data_config),
        labels=labels,
        data_config=created.data_config,
        config=config,
        run_dir=None,
    )


def load_checkpoint_or_default(
    checkpoint: str | Path | None, device: str | torch.device = "cpu"
) -> LoadedRun:
    """`load_run(checkpoint)` when one is given, else the embedded ImageNet model (CLIs and app default)."""
    return load_run(checkpoint, device) if checkpoint else load_default_run(device)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; anything else (a pickle posing as one, a truncated file) is refused."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a valid safetensors file ({str(error)[:200]}); the checkpoint is damaged or "
            "was not written by finetune. Pickled checkpoints are never loaded."
        ) from error


def label_names_of(config: dict[str, Any], num_classes: int) -> list[str]:
    """Class names from a timm config (list or {index: name}), ImageNet names for 1000 unnamed classes."""
    names = config.get("label_names") or config.get("pretrained_cfg", {}).get("label_names")
    if isinstance(names, dict):
        names = [names.get(str(index), names.get(index, f"class_{index}")) for index in range(num_classes)]
    if names and len(names) == num_classes:
        return [str(name) for name in names]
    if num_classes == 1000:
        return imagenet_labels()
    return [f"class_{index}" for index in range(num_classes)]


def imagenet_labels() -> list[str]:
    """Readable ImageNet-1k names ('tabby cat' rather than 'n02123045'), first synonym only."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return [info.index_to_description(index).split(",")[0].strip() for index in range(1000)]


def save_train_state(run_dir: Path, state: dict[str, Any]) -> None:
    """Save a nested state (model, optimizer, scheduler, EMA, counters) as safetensors + JSON, atomically.

    Tensors go to `train_state.safetensors`, everything else to `train_state.json`; both carry the same random
    `state_id`, written tensors first, so a crash between the two renames is detected on resume, not loaded.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    state_id = uuid.uuid4().hex
    atomic_write(
        run_dir / STATE_TENSORS_FILE,
        lambda tmp: save_file(tensors, str(tmp), metadata={"state_id": state_id}),
    )
    write_json(run_dir / STATE_META_FILE, {"state_id": state_id, "state": skeleton})


def load_train_state(run_dir: Path) -> dict[str, Any]:
    """Read back what `save_train_state` wrote; a missing, torn or tampered state is a `CheckpointError`."""
    meta_path, tensors_path = run_dir / STATE_META_FILE, run_dir / STATE_TENSORS_FILE
    if not meta_path.is_file() or not tensors_path.is_file():
        raise CheckpointError(f"'{run_dir}' has no resumable training state ({STATE_META_FILE}).")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        from safetensors import safe_open

        with safe_open(str(tensors_path), framework="pt") as handle:
            stored_id = (handle.metadata() or {}).get("state_id")
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as error:
        raise CheckpointError(f"the training state in '{run_dir}' is damaged: {error}") from error
    if stored_id != meta.get("state_id"):
        raise CheckpointError(
            f"the training state in '{run_dir}' is inconsistent (interrupted while saving); "
            "start a new run or delete train_state.* to resume from the best weights."
        )
    return _unflatten(meta["state"], read_safetensors(tensors_path))


def read_train_config(run_dir: Path) -> dict[str, Any]:
    """The training config saved with a run's resumable state (JSON only; no tensors are read)."""
    meta_path = Path(run_dir) / STATE_META_FILE
    if not meta_path.is_file():
        raise CheckpointError(f"'{run_dir}' has no resumable training state ({STATE_META_FILE}).")
    try:
        return dict(json.loads(meta_path.read_text(encoding="utf-8"))["state"]["config"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"the training state in '{run_dir}' is damaged: {error}") from error


def _flatten(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _flatten(v, f"{key}.{k}" if key else k, tensors) for k, v in value.items()}
        return {"__intdict__": [[k, _flatten(v, f"{key}.{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_flatten(v, f"{key}.{i}", tensors) for i, v in enumerate(value)]
    return value


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__intdict__" in value:
            return {k: _unflatten(v, tensors) for k, v in value["__intdict__"]}
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        return {k: _unflatten(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def _data_config_of(config: dict[str, Any]) -> dict[str, Any]:
    saved = config.get("data_config") or config.get("pretrained_cfg", {})
    missing = [key for key in ("input_size", "mean", "std") if key not in saved]
    if missing:
        raise CheckpointError(f"config.json has no preprocessing {missing}; cannot rebuild the transform.")
    data_config = {key: saved[key] for key in DATA_CONFIG_KEYS if key in saved}
    data_config.setdefault("interpolation", "bicubic")
    data_config.setdefault("crop_pct", 0.875)
    data_config.setdefault("crop_mode", "center")
    return data_config


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")
