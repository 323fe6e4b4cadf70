"""torch.distributed set-up for runs launched with torchrun (NCCL on GPUs, gloo on CPU); a no-op for one process."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class Distributed:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of a tensor over all processes (the tensor itself for one process)."""
        if self.world == 1:
            return value
        value = value.clone()
        dist.all_reduce(value)
        return value / self.world

    def all_true(self, flag: bool) -> bool:
        """Whether `flag` holds on every process (under sharding each process checks only its own shards)."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item())

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def local_tensors(tensors) -> list[torch.Tensor]:
    """This process's part of each tensor: a DTensor's local shard (FSDP2), a plain tensor itself. Without autograd
    recording, to_local() returns the shard's own storage, so in-place updates reach the DTensor."""
    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]


def init_distributed(device: str | None = None) -> Distributed:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group when there is more than one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # torch.cuda.set_device needs an index: this process's GPU
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Distributed(rank, world, local_rank, device)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
