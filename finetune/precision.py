"""Which floating-point precision a run computes in: autocast dtypes per device, and for training steps.

One rule for the CLI, the app and `torchrun` workers, so that a run and its resume compute alike.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

FP32_TRAINING_MAX_PX = 96  # CPUs without AMX train at or below this size in fp32 (`training_precision`)


@dataclass
class Precision:
    """Autocast settings for the device: bf16 on CPUs with AVX-512 BF16 and recent GPUs, else fp16/fp32."""

    device: torch.device
    dtype: torch.dtype | None  # None means fp32 (no autocast)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[self.dtype]

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """Map --precision to an autocast dtype that this device really supports."""
    if requested == "fp32":
        return Precision(device, None)
    if device.type == "cuda":
        return Precision(device, cuda_autocast_dtype(requested, torch.cuda.get_device_capability(device)))
    if requested == "fp16":
        return Precision(device, None)  # CPU fp16 autocast is slower than fp32; treat as fp32
    bf16_ok = bool(getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)())
    return Precision(device, torch.bfloat16 if bf16_ok else None)


def training_precision(precision: Precision, requested: str, image_size: int) -> Precision:
    """The precision of training steps: `precision`, except fp32 for small images on a CPU without AMX.

    bf16 autocast halves a CPU's forward pass, but not its backward pass. On the 2-core AMD EPYC (AVX-512
    BF16, no AMX) of our CI, tf_efficientnet_lite0 trained (forward + backward + AdamW, batch 32) faster in
    fp32 on small images and no faster on large ones (`python bench/train_precision.py`, fp32 vs bf16 img/s):
    whole backbone 32 px 419 vs 217, 64 px 221 vs 144, 96 px 120 vs 99, 128 px 65 vs 67, 224 px 18 vs 23;
    first half frozen 64 px 296 vs 191, 128 px 128 vs 108, 224 px 36 vs 37. Large fp32 activations also cost
    memory (a 224 px run: 3.85 against 2.53 GB peak RSS), so fp32 is kept to FP32_TRAINING_MAX_PX. Inference
    is faster in bf16 (64 px: 0.54 against 0.83 ms an image; 224 px: 8.5 against 19.5), so evaluation keeps
    `precision`. CPUs with AMX tiles (Intel Sapphire Rapids and later) run bf16 on them and keep it. A rule,
    not a timing race, so that a run and its resume (and two runs of one command) train in the same precision.
    """
    if requested != "auto" or precision.device.type != "cpu" or precision.dtype is None:
        return precision
    if image_size > FP32_TRAINING_MAX_PX or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return precision
    return Precision(precision.device, None)


def cuda_autocast_dtype(requested: str, capability: tuple[int, int]) -> torch.dtype:
    """bf16 only on GPUs that have it natively (compute capability 8.0+: A100, RTX 30xx, H100), else fp16.

    `torch.cuda.is_bf16_supported()` also says yes on T4 and V100 (7.x), which only emulate bf16, slowly;
    fp16 runs on their tensor cores and, with a GradScaler, trains as well. An explicit `bf16` is obeyed.
    """
    if requested == "fp16":
        return torch.float16
    if requested == "bf16":
        if capability < (8, 0):
            logger.warning(
                "This GPU (compute capability %d.%d) only emulates bf16; fp16 is faster.", *capability
            )
        return torch.bfloat16
    return torch.bfloat16 if tuple(capability) >= (8, 0) else torch.float16
