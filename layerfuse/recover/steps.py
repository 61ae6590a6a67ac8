"""The nodes of an ONNX graph as torch steps, and units of consecutive steps.

A :class:`Step` is one node bound to its torch implementation (the registry of
:mod:`layerfuse.recover.ops_math` and :mod:`layerfuse.recover.ops_shape`); Constant nodes
become tensors. Running steps is a walk over a dict of named tensors in graph (topological)
order, each dropped after its last reader. A :class:`Unit` is a run of consecutive steps with
the weights only they read: a module of its own, so sharded data parallel can gather those
weights when the unit starts and free them when it ends (:mod:`layerfuse.recover.sharding`).
"""

from __future__ import annotations

__all__ = ["Step", "Unit", "compile_graph", "plan_releases", "run_steps"]

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from torch import nn

from layerfuse.errors import LayerfuseError
from layerfuse.recover.ops_math import MATH_OPS
from layerfuse.recover.ops_shape import SHAPE_OPS

OPS = {**MATH_OPS, **SHAPE_OPS}
# Contrib ops onnxruntime registers in the default domain and this registry implements.
_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _attribute(attr: ir.Attr):
    kind = attr.type
    if kind == ir.AttributeType.TENSOR:
        return torch.from_numpy(np.array(attr.as_tensor().numpy()))
    if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise NotImplementedError("subgraph attributes (If, Loop, Scan)")
    value = attr.value
    return list(value) if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS) else value


def _constant_value(node: ir.Node) -> torch.Tensor:
    attrs = node.attributes
    if "value" in attrs:
        return _attribute(attrs["value"])
    for name, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if name in attrs:
            return torch.tensor(attrs[name].value, dtype=dtype)
    for name, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if name in attrs:
            return torch.tensor(list(attrs[name].value), dtype=dtype)
    raise NotImplementedError("a Constant without a numeric value")


@dataclass
class Step:
    op: object
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict
    label: str
    op_type: str
    release: list[str] = field(default_factory=list)


def compile_graph(graph: ir.Graph) -> tuple[list[Step], dict[str, torch.Tensor]]:
    """The nodes as steps to run, and Constant node outputs as tensors."""
    steps, constants = [], {}
    for node in graph:
        label = f"node '{node.name}' ({node.op_type})"
        if node.domain not in _DOMAINS or (node.op_type not in OPS and node.op_type != "Constant"):
            domain = f"{node.domain}." if node.domain else ""
            raise LayerfuseError(
                f"{label}: the recovery interpreter has no implementation of {domain}{node.op_type}"
            )
        try:
            if node.op_type == "Constant":
                constants[node.outputs[0].name] = _constant_value(node)
                continue
            attrs = {name: _attribute(attr) for name, attr in node.attributes.items()}
        except NotImplementedError as exc:
            raise LayerfuseError(f"{label}: not supported ({exc})") from None
        steps.append(
            Step(
                OPS[node.op_type],
                [None if v is None or not v.name else v.name for v in node.inputs],
                [v.name for v in node.outputs],
                attrs,
                label,
                node.op_type,
            )
        )
    return steps, constants


def plan_releases(steps: list[Step], keep: set[str]) -> None:
    """Mark each tensor not in ``keep`` to be dropped by its last reader."""
    for step in steps:
        step.release.clear()
    last_use: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.inputs:
            if name is not None:
                last_use[name] = index
    for name, index in last_use.items():
        if name not in keep:
            steps[index].release.append(name)


def run_steps(steps: list[Step], values: dict[str, torch.Tensor], *, release: bool) -> None:
    """Run ``steps`` on ``values`` in place; ``release`` drops tensors after their last reader."""
    for step in steps:
        args = [None if name is None else values[name] for name in step.inputs]
        try:
            result = step.op(args, step.attrs)
        except NotImplementedError as exc:
            raise LayerfuseError(f"{step.label}: not supported ({exc})") from None
        if isinstance(result, torch.Tensor):
            result = (result,)
        for name, tensor in zip(step.outputs, result, strict=False):
            if name:
                values[name] = tensor
        if release:
            for name in step.release:
                values.pop(name, None)


class Unit(nn.Module):
    """Consecutive steps and the weights only they read.

    The weights enter the tensors by name when the unit starts and leave when it ends, so
    they are read only inside this module's forward: the condition for FSDP to hold them
    sharded outside it.
    """

    def __init__(self, steps: list[Step], names: list[str], weights: list[nn.Parameter]) -> None:
        super().__init__()
        self.steps, self.names = steps, names
        self.weights = nn.ParameterList(weights)

    def forward(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        values = {**values, **dict(zip(self.names, self.weights, strict=True))}
        run_steps(self.steps, values, release=True)
        for name in self.names:
            values.pop(name, None)
        return values
