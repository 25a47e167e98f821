"""DistributedDataParallel under `torchrun`: which process this is, and the process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, requested: torch.device) -> torch.device:
        """Under DDP on CUDA each process takes the GPU of its local rank."""
        if self.world > 1 and requested.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return requested


def init_distributed() -> Dist:
    """Join the process group torchrun describes (WORLD_SIZE > 1); a single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Dist(rank=dist.get_rank(), world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def all_sum(values: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_ints(values: list[int], d: Dist, device: torch.device) -> list[int]:
    """Rank 0's `values` on every rank (`device`: where the backend takes tensors, CUDA for nccl)."""
    if d.world <= 1:
        return values
    t = torch.tensor(values, dtype=torch.int64, device=device)
    dist.broadcast(t, src=0)
    return t.tolist()


def barrier(d: Dist) -> None:
    if d.world > 1:  # nccl: on this rank's GPU (it would guess one otherwise)
        dist.barrier(device_ids=[d.local_rank] if dist.get_backend() == "nccl" else None)
