"""Process-group setup for `torchrun`: who am I, which device, and the few collectives the engine needs.

A plain `python -m finetune` run is a world of one, where every helper here is a no-op, so the engine has one
code path for one process and for many.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

TIMEOUT_ENV = "FINETUNE_DIST_TIMEOUT_S"
# How long a process waits for the others in one collective before the job fails. It covers the longest
# one-sided wait: the other processes of a node wait while its first process decodes the image cache.
DEFAULT_TIMEOUT_S = 1800.0


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

    def share(self, count: int) -> torch.Tensor:
        """This process's contiguous share of `range(count)`, all shares the same length.

        The last shares wrap around to the start when `count` does not divide evenly, so collectives on
        per-share results see equal sizes; `all_gather_rows` drops the repeats again.
        """
        per_rank = -(-count // self.world_size)
        return torch.arange(self.rank * per_rank, (self.rank + 1) * per_rank) % max(count, 1)

    def all_gather_rows(self, rows: torch.Tensor, count: int) -> torch.Tensor:
        """Every process's `share()` rows, concatenated in rank order: the `count` rows of the whole set."""
        if not self.is_distributed:
            return rows[:count]
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        local = rows.to(device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts)[:count].to(rows.device)

    def broadcast_(self, tensors: list[torch.Tensor]) -> None:
        """Overwrite `tensors` in place with rank 0's values (keeps a result identical on every process)."""
        if not self.is_distributed:
            return
        device = self.device if self.device.type == "cuda" else torch.device("cpu")
        for tensor in tensors:
            buffer = tensor.detach().to(device)
            dist.broadcast(buffer, src=0)
            tensor.detach().copy_(buffer)

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


def init_distributed(requested_device: str = "auto", timeout_s: float | None = None) -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): nccl on CUDA, gloo on CPU.

    `timeout_s` (default: $FINETUNE_DIST_TIMEOUT_S, else 30 minutes) bounds every wait for the other
    processes, so a process that hangs rather than dies still ends the job instead of stalling it forever.
    """
    timeout_s = timeout_s if timeout_s is not None else collective_timeout_s()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested_device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        logger.info(
            "Joined process group: rank %d of %d (%s, timeout %.0f s)", rank, world_size, backend, timeout_s
        )
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_timeout_s() -> float:
    """The collective timeout from $FINETUNE_DIST_TIMEOUT_S, checked, or the default."""
    from finetune.errors import ConfigError

    text = os.environ.get(TIMEOUT_ENV, "")
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise ConfigError(
            f"{TIMEOUT_ENV}={text!r} is not a positive number of seconds; unset it or use e.g. 3600."
        )
    return value


def is_collective_failure(error: BaseException) -> bool:
    """Did a collective fail (a peer died, hung or lost its network) rather than this process's own work?

    gloo reports a dead peer as a plain RuntimeError from its TCP transport, NCCL and the stores as
    `DistError`s; a bug or an out-of-memory error of this process is neither.
    """
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("gloo" in text or "NCCL" in text)


def resume_command(run_dir: Path, world_size: int) -> str:
    """How to continue a run, with the launcher it was started with."""
    if world_size > 1:
        return f"torchrun --nproc_per_node={world_size} -m finetune --resume {run_dir}"
    return f"python -m finetune --resume {run_dir}"
