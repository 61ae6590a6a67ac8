"""Sharded data parallel: the student's weights, gradients and AdamW state split over processes.

``recover --parallel fsdp`` under torchrun or ``accelerate launch`` applies FSDP2
(``torch.distributed.fsdp.fully_shard``, CPU/gloo and CUDA/nccl alike) one transformer block
at a time: the student's steps are cut after the residual stream of every block the
detection finds (:meth:`GraphModule.partition`), each block's weights become one FSDP unit,
and the weights read in several blocks (a tied FF window spanning a cut, an embedding tied to
the head) stay in the root unit. Each process keeps 1/N of every parameter, of its gradient
and of both AdamW moments; a block's weights are all-gathered when its forward starts and
freed when it ends (gathered again for its backward, whose gradients are reduce-scattered at
once, also between accumulated micro-batches). Frozen weights (``--train touched``) are
sharded too and stay out of the optimizer; the gradient clip takes the global norm.

Peak student memory per process: about 4/N of the weights (weights, gradients, two moments,
each sharded) plus the best parameters kept (1/N), one or two whole blocks in flight, the
root unit's weights and gradients whole, and the activations of the process's share of a
micro-batch; DistributedDataParallel holds 4x the weights plus its gradient buckets and the
best copy (about 6x). Not sharded: the teacher (onnxruntime runs the whole original in every
process), the student while it is built and locally reconstructed (whole in every process,
then sharded before distillation), and on process 0 the whole state it gathers to write a
checkpoint (3x the weights on its CPU) and the unsharded copy it rebuilds to write the
output. docs/big_models.md has the figures measured on SmolLM2-135M.

Everything that reads or writes parameters goes through this module, so the same code serves
one process, DDP and FSDP: checkpoints hold whole tensors by initializer name (gathered on
process 0, cut back into shards on load), the same format whatever the parallelism, and a
resume continues bit for bit; the best parameters are kept as each process's own part.
"""

from __future__ import annotations

__all__ = [
    "block_boundaries",
    "full_params",
    "gather_optimizer",
    "load_params",
    "local",
    "local_params",
    "restore_local",
    "shard",
    "shard_optimizer",
]

import warnings

import onnx_ir as ir
import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from layerfuse.errors import DetectionError
from layerfuse.passes.detect import detect_structure
from layerfuse.recover.graph_module import GraphModule


def block_boundaries(model: ir.Model) -> list[str]:
    """The residual stream after each block of ``model``; none (the root alone) without
    detected blocks (encoders and families detection does not map still train, unsplit)."""
    try:
        blocks = detect_structure(model).blocks
    except DetectionError:
        return []
    return [block.stream_out.name for block in blocks if block.stream_out is not None]


def shard(student: GraphModule, device: torch.device, world_size: int) -> GraphModule:
    """``student`` with every unit that owns weights, then the root, sharded in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    # A unit returns views (Reshape, Slice); FSDP warns that an in-place op on one would skip
    # its backward hook, but the interpreter's ops never write in place.
    warnings.filterwarnings("ignore", "FSDP2-wrapped module .* returned a view tensor")
    mesh = init_device_mesh(device.type, (world_size,))
    for unit in student.units:
        if unit.names:
            fully_shard(unit, mesh=mesh)
    fully_shard(student, mesh=mesh)
    return student


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's part of ``tensor``: its shard, or all of an unsharded tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _like(parameter: torch.Tensor, whole: torch.Tensor) -> torch.Tensor:
    """``whole`` laid out as ``parameter``: cut into its shards (no communication)."""
    whole = whole.to(parameter.device)
    if isinstance(parameter, DTensor):
        mesh, placements = parameter.device_mesh, parameter.placements
        return distribute_tensor(whole, mesh, placements, src_data_rank=None)
    return whole


def _gather(tensor: torch.Tensor, keep: bool) -> torch.Tensor | None:
    """All of ``tensor`` on the CPU where ``keep``, else None; collective when sharded, so
    every process calls it. An unsharded CPU tensor comes back as itself, not copied: the
    result is for saving or copying at once."""
    tensor = tensor.detach()
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.cpu() if keep else None


def full_params(student: GraphModule, keep: bool) -> dict[str, torch.Tensor | None]:
    """Every weight whole by initializer name, where ``keep`` (process 0); collective."""
    return {name: _gather(p, keep) for name, p in student.named_weights().items()}


def load_params(student: GraphModule, params: dict[str, torch.Tensor]) -> None:
    """Set every weight from whole tensors by initializer name (each process takes its part)."""
    with torch.no_grad():
        for name, parameter in student.named_weights().items():
            parameter.copy_(_like(parameter, params[name]))


def local_params(student: GraphModule, params: dict[str, torch.Tensor] | None = None) -> dict:
    """This process's part of every weight, copied to the CPU: of the student's own, or of
    whole ``params`` by initializer name (copied, so the whole tensors can be freed)."""
    weights = student.named_weights()
    if params is not None:
        weights = {name: _like(p, params[name]) for name, p in weights.items()}
    return {name: local(p).detach().cpu().clone() for name, p in weights.items()}


def restore_local(student: GraphModule, parts: dict[str, torch.Tensor]) -> None:
    """Set every weight from this process's parts (:func:`local_params`)."""
    with torch.no_grad():
        for name, parameter in student.named_weights().items():
            local(parameter).copy_(parts[name])


def gather_optimizer(optimizer: torch.optim.Optimizer, keep: bool) -> dict | None:
    """The optimizer's state with whole tensors, where ``keep``; collective."""
    state = optimizer.state_dict()
    entries = {
        index: {key: _gather(v, keep) if torch.is_tensor(v) else v for key, v in entry.items()}
        for index, entry in state["state"].items()
    }
    return {**state, "state": entries} if keep else None


def shard_optimizer(state: dict, parameters: list[torch.Tensor]) -> dict:
    """A state of :func:`gather_optimizer` laid out as ``parameters`` (the optimizer's, in
    order): each moment cut like its parameter; the step count stays a scalar."""
    entries = {}
    for index, entry in state["state"].items():
        parameter = parameters[index]
        entries[index] = {
            key: _like(parameter, v) if torch.is_tensor(v) and v.shape == parameter.shape else v
            for key, v in entry.items()
        }
    return {**state, "state": entries}
