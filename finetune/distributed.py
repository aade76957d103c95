"""Process-group setup for `torchrun`: who am I, which device, and the few collectives the engine needs.

A plain `python -m finetune` run is a world of one, where every helper here is a no-op, so the engine has one
code path for one process and for many.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


@dataclass
class DistContext:
    """Rank, world size and device of this process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, logs progress and draws plots."""
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        """One process per node builds the node's decoded-image cache."""
        return self.local_rank == 0

    def barrier(self) -> None:
        if self.is_distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sum a few numbers across processes (counts, losses) in one collective."""
        if not self.is_distributed:
            return list(values)
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def any_true(self, flag: bool) -> bool:
        """True on every process if it is true on any: stop together (early stopping, Ctrl-C)."""
        return self.all_reduce_sum([1.0 if flag else 0.0])[0] > 0

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every process (epochs chosen from a timing, for example)."""
        if not self.is_distributed:
            return value
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        tensor = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(tensor, src=0)
        return int(tensor.item())


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """`auto` is CUDA when present; each process of a node gets its own GPU."""
    from finetune.errors import ConfigError

    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "--device cuda was requested but no CUDA GPU is available; use --device auto or cpu."
        )
    if requested in ("cuda", "auto") and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(requested_device: str = "auto", timeout_s: float = 600.0) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        logger.info("Joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
