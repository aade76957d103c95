"""`TrainConfig`: every training option with its default, validated once, saved into the run folder."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.data import VAL_MAX_IMAGES
from finetune.errors import ConfigError
from finetune.modeling import DEFAULT_MODEL

STRATEGIES = ("auto", "linear", "finetune", "lp-ft")
BALANCE_MODES = ("auto", "none", "loss", "sampler")
AUGMENT_MODES = ("auto", "on", "off")  # --augment: the training jitter (finetune/augment.py)
MULTILABEL_LOSSES = ("bce", "asl")  # finetune/multilabel.py make_loss
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class TrainConfig:
    """Options of `python -m finetune`; flags are kebab-case mirrors of these fields."""

    data_dir: Path  # folder of class subfolders, or train/ with optional val/ (or valid/) and test/ beside it
    out: Path  # run folder to write (weights, config, metrics, plots)
    model: str = DEFAULT_MODEL  # any timm architecture name
    weights: str = "auto"  # "auto" (embedded or timm download), "none" (random init) or a weights file
    strategy: str = "auto"  # auto | linear | finetune | lp-ft
    epochs: int = 0  # fine-tuning epochs; 0 chooses from the dataset size (and the time budget)
    time_budget_s: float = 900.0  # auto: fine-tune only if it fits, and stop adding epochs past it
    batch_size: int = 32  # global batch size (split across processes when distributed)
    lr: float = 1e-3  # peak learning rate of the head at batch size 32 (scaled linearly with batch size)
    layer_decay: float = 0.85  # each earlier layer group gets this factor of the next one's learning rate
    weight_decay: float = 0.02  # decoupled weight decay (AdamW)
    opt: str = "adamw"  # any timm optimizer name (create_optimizer_v2)
    warmup_epochs: float = 1.0  # linear warmup before the cosine decay
    label_smoothing: float = 0.1  # cross-entropy label smoothing
    clip_grad: float = 1.0  # max gradient norm; 0 disables clipping
    ema: bool = False  # evaluate, keep and save an exponential moving average of the weights (and buffers)
    ema_decay: float = 0.998  # EMA decay once warmed up (it rises from 0 as 1 - (1 + step) ** -0.75)
    multilabel_loss: str = "bce"  # labels CSV runs: bce (timm BinaryCrossEntropy) | asl (asymmetric loss)
    balance: str = "auto"  # auto (loss weights when classes differ 3x or more) | none | loss | sampler
    img_size: int = 0  # square train/eval size; 0 picks from the data (finetune/recipe.py plan_recipe)
    hflip: bool = False  # random horizontal flips (off: they change the meaning of text, digits, parts)
    augment: str = "auto"  # auto | on | off: the training jitter (auto: off for large sets seen <= 6 times)
    trunk_cache: bool = True  # frozen layers run once per image when there is no jitter (trunk_cache.py)
    freeze_bn: bool = True  # keep BatchNorm running statistics fixed while fine-tuning (stable on small data)
    frozen_groups: int = (
        -1
    )  # leading layer groups (stem first) kept frozen when fine-tuning; -1 = from the data (recipe.py)
    val_fraction: float = 0.2  # share of each class held out when DATA_DIR has no val/ folder
    val_max_images: int = VAL_MAX_IMAGES  # ...but at most about this many (large sets hold out less); 0: all
    accept_rate: float = 0.95  # "none of these" threshold: the share of validation images it accepts
    patience: int = 3  # early stopping: epochs without a better validation score
    probe_epochs: int = 60  # linear-probe epochs on cached features (cheap: the backbone runs once)
    seed: int = 0  # seeds the split, shuffling and augmentation
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto (bf16 on CPUs that support it, fp16/bf16 on CUDA) | bf16 | fp16 | fp32
    workers: int = 0  # decoding threads; 0 uses every core
    cache_dir: Path | None = None  # where decoded images are cached; default RUN_DIR/.cache
    cache_max_gb: float = 0.0  # larger decoded sets stream from the files instead; 0 = the free disk
    quiet: bool = False  # no progress bars
    exclude_issues: Path | None = None  # data_report.json or data_issues.txt: files left out of training

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        self.out = Path(self.out)
        self.cache_dir = Path(self.cache_dir) if self.cache_dir else None
        self.exclude_issues = Path(self.exclude_issues) if self.exclude_issues else None
        _choice("strategy", self.strategy, STRATEGIES)
        _choice("balance", self.balance, BALANCE_MODES)
        _choice("augment", self.augment, AUGMENT_MODES)
        _choice("multilabel_loss", self.multilabel_loss, MULTILABEL_LOSSES)
        _choice("device", self.device, DEVICES)
        _choice("precision", self.precision, PRECISIONS)
        _at_least("epochs", self.epochs, 0)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("patience", self.patience, 1)
        _at_least("probe_epochs", self.probe_epochs, 1)
        _at_least("workers", self.workers, 0)
        _at_least("val_max_images", self.val_max_images, 0)
        _at_least("frozen_groups", self.frozen_groups, -1)
        _at_least("warmup_epochs", self.warmup_epochs, 0)
        _at_least("weight_decay", self.weight_decay, 0)
        _at_least("clip_grad", self.clip_grad, 0)
        _at_least("cache_max_gb", self.cache_max_gb, 0)
        _at_least("time_budget_s", self.time_budget_s, 1)
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"invalid lr {self.lr}; use a positive number such as 1e-3.")
        if not 0 < self.layer_decay <= 1:
            raise ConfigError(
                f"invalid layer_decay {self.layer_decay}; use a value in (0, 1], 1 disables it."
            )
        if not 0 <= self.label_smoothing < 1:
            raise ConfigError(f"invalid label_smoothing {self.label_smoothing}; use a value in [0, 1).")
        if not 0 < self.ema_decay < 1:
            raise ConfigError(f"invalid ema_decay {self.ema_decay}; use a value in (0, 1), such as 0.998.")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(
                f"invalid val_fraction {self.val_fraction}; use a value in (0, 1), such as 0.2."
            )
        if not 0.5 <= self.accept_rate < 1:
            raise ConfigError(
                f"invalid accept_rate {self.accept_rate}; use a value in [0.5, 1), such as 0.95."
            )
        if self.img_size and not 32 <= self.img_size <= 1024:
            raise ConfigError(f"invalid img_size {self.img_size}; use 0 (auto) or a size from 32 to 1024.")
        if self.out.exists() and self.out.resolve() == self.data_dir.resolve():
            raise ConfigError("--out must not be the dataset folder; choose a new run folder.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly fields, for config.json and the resumable state."""
        return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Rebuild from `to_dict()` output, ignoring keys a newer or older version added or removed."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"invalid {name} '{value}'; choose one of: {', '.join(allowed)}.")


def _at_least(name: str, value: float, minimum: float) -> None:
    if not isinstance(value, (int, float)) or value < minimum:
        raise ConfigError(f"invalid {name} {value!r}; it must be at least {minimum}.")
