"""Data-parallel training across processes: torchrun / accelerate launch, unchanged.

Both launchers start one process per device and set ``WORLD_SIZE``, ``RANK``,
``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` (processes on this machine), ``MASTER_ADDR`` and
``MASTER_PORT``, on one machine or several; :func:`from_environment` joins the
process group they describe (gloo on CPU, nccl on CUDA). Every process reads the same global
batch (the data order depends only on the seed and the step) and trains on its share; the
gradients are averaged by DistributedDataParallel (``ddp``: every process holds the whole
student and its optimizer) or reduce-scattered by FSDP (``fsdp``: each holds a shard, see
:mod:`layerfuse.recover.sharding`); process 0 alone writes files. Under one process both
are plain single-process training.
"""

from __future__ import annotations

__all__ = ["PARALLEL_CHOICES", "Distributed", "from_environment"]

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from layerfuse.errors import LayerfuseError

PARALLEL_CHOICES = ("ddp", "fsdp")


@dataclass(frozen=True)
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str = "ddp"
    local_world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def sharded(self) -> bool:
        return self.active and self.parallel == "fsdp"

    @property
    def scoring(self) -> Distributed:
        """How validation shares its batches out: each process its share under DDP; under
        FSDP every process scores every batch, since a sharded forward is collective and all
        processes must run the same number of them."""
        return Distributed() if self.sharded else self

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

    def from_main(self, value: float) -> float:
        """Process 0's ``value`` in every process, so decisions taken on it agree."""
        if not self.active:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.broadcast(tensor, src=0)
        return float(tensor[0])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def wrap(self, module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        if not self.active:
            return module
        if self.sharded:
            from layerfuse.recover.sharding import shard

            return shard(module, device, self.world_size)
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)

    def accumulating(self, model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
        """DDP skips the all-reduce on all but the last accumulated micro-batch; FSDP always
        reduce-scatters, so no process ever holds whole gradients between micro-batches."""
        if self.active and not self.sharded and not sync:
            return model.no_sync()
        return contextlib.nullcontext()

    def after_forward(self, model: torch.nn.Module) -> None:
        """FSDP keeps the root unit's weights whole after a forward, expecting its backward;
        after a forward without one (validation) they are put back into shards."""
        if self.sharded:
            model.reshard()

    def close(self) -> None:
        if self.active and dist.is_initialized():
            dist.destroy_process_group()


def from_environment(device: str, parallel: str = "ddp") -> Distributed:
    """The process group a launcher set up, or a single process when none did."""
    if parallel not in PARALLEL_CHOICES:
        raise LayerfuseError(f"unknown --parallel '{parallel}' (choose ddp or fsdp)")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed(parallel=parallel)
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    return Distributed(rank, world_size, local_rank, parallel, local_world_size)
