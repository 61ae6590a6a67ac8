"""Data-parallel training across processes: torchrun / accelerate launch, unchanged.

Both launchers start one process per device and set ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`from_environment` joins the
process group they describe (gloo on CPU, nccl on CUDA). Every process reads the same global
batch (the data order depends only on the seed and the step) and trains on its share; the
gradients are averaged by DistributedDataParallel; process 0 alone writes files.
"""

from __future__ import annotations

__all__ = ["Distributed", "from_environment"]

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, count: int) -> slice:
        """This process's rows of a micro-batch of ``count`` rows."""
        return slice(self.rank, count, self.world_size)

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over all processes."""
        if not self.active:
            return values
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.active:
            return module
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device: str) -> Distributed:
    """The process group a launcher set up, or a single process when none did."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    return Distributed(rank, world_size, local_rank)
