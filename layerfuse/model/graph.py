"""Small graph queries shared by detection and the rewriting passes.

Exporters wrap the interesting tensors in shape plumbing (GPT-2's Conv1D flattens to 2-D
around every Gemm, the TorchScript exporter inserts Casts and Identities). These helpers look
through that plumbing so that the detectors can reason about the dataflow that matters.
"""

from __future__ import annotations

__all__ = [
    "VIEW_OPS",
    "WEIGHT_PATH_OPS",
    "WeightSource",
    "bypass",
    "constant_array",
    "constant_source",
    "consumers",
    "is_constant",
    "node_index",
    "skip_views_down",
    "skip_views_up",
    "weight_source",
]

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

# Ops that change only how a tensor is viewed; their data input is input 0.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
# Ops exporters put between a stored weight and the MatMul/Gemm that reads it. Anything on this
# path is per consumer: onnxruntime folds it into a private copy of the weight at load time.
WEIGHT_PATH_OPS = frozenset({"Transpose", "Cast", "Identity"})


def consumers(value: ir.Value) -> list[ir.Node]:
    """Distinct nodes that read ``value``, in graph order of first use."""
    seen: dict[int, ir.Node] = {}
    for use in value.uses():
        seen.setdefault(id(use.node), use.node)
    return list(seen.values())


def constant_source(value: ir.Value | None) -> ir.Value | None:
    """The initializer or Constant output behind ``value``, looking through Identity chains.

    The TorchScript exporter deduplicates equal initializers by routing several layers
    through ``Identity(shared)``, so a bias may be an Identity output.
    """
    while value is not None:
        if value.const_value is not None:
            return value
        node = value.producer()
        if node is None:
            return None
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            return value
        if node.op_type != "Identity" or not node.inputs:
            return None
        value = node.inputs[0]
    return None


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The data behind ``value`` if it is constant (see :func:`constant_source`), else None."""
    source = constant_source(value)
    if source is None:
        return None
    if source.const_value is not None:
        return source.const_value.numpy()
    node = source.producer()
    attr = node.attributes.get("value")
    if attr is not None:
        return attr.as_tensor().numpy()
    for name in ("value_float", "value_int"):
        if name in node.attributes:
            return np.array(node.attributes[name].value)
    for name in ("value_floats", "value_ints"):
        if name in node.attributes:
            return np.array(list(node.attributes[name].value))
    return None


def is_constant(value: ir.Value | None) -> bool:
    return constant_source(value) is not None


def skip_views_up(value: ir.Value) -> ir.Value:
    """Follow ``value`` back through view ops to the tensor they reshape."""
    node = value.producer()
    while node is not None and node.op_type in VIEW_OPS and node.inputs and node.inputs[0]:
        value = node.inputs[0]
        node = value.producer()
    return value


def skip_views_down(value: ir.Value) -> list[ir.Value]:
    """``value`` and every view of it reachable through chains of view ops."""
    found = [value]
    frontier = [value]
    while frontier:
        current = frontier.pop()
        for node in consumers(current):
            if node.op_type in VIEW_OPS and node.inputs and node.inputs[0] is current:
                found.append(node.outputs[0])
                frontier.append(node.outputs[0])
    return found


def node_index(graph: ir.Graph) -> dict[ir.Node, int]:
    """Position of each node in the (topologically sorted) graph."""
    return {node: i for i, node in enumerate(graph)}


@dataclass(frozen=True)
class WeightSource:
    """The initializer behind a weight input, and the per-consumer ops in between."""

    initializer: ir.Value
    path: tuple[ir.Node, ...]
    transposes: int


def weight_source(value: ir.Value | None) -> WeightSource | None:
    """Trace a MatMul/Gemm weight input back through :data:`WEIGHT_PATH_OPS` to a 2-D
    initializer; None when anything else (or a non-2-D transpose) is in the way."""
    path: list[ir.Node] = []
    flips = 0
    while value is not None and value.const_value is None:
        node = value.producer()
        if node is None or node.op_type not in WEIGHT_PATH_OPS or len(node.inputs) != 1:
            return None
        if node.op_type == "Transpose":
            perm = node.attributes.get("perm")
            if perm is not None and list(perm.as_ints()) != [1, 0]:
                return None
            flips += 1
        path.insert(0, node)
        value = node.inputs[0]
    if value is None or value.const_value is None or len(value.const_value.shape) != 2:
        return None
    return WeightSource(value, tuple(path), flips)


def bypass(value: ir.Value, replacement: ir.Value) -> None:
    """Make every reader of ``value`` read ``replacement`` instead (the residual pass-through).

    A graph output keeps its name and position: an Identity from ``replacement`` produces it,
    so removing the last block does not rename the model's output.
    """
    graph = value.graph
    if value.is_graph_output() and graph is not None:
        name = value.name
        value.name = f"{name}.bypassed"
        identity = ir.node(
            "Identity", [replacement], outputs=[ir.Value(name=name)], name=f"{name}.bypass"
        )
        identity.outputs[0].type = value.type
        identity.outputs[0].shape = value.shape
        graph.append(identity)
        for index, output in enumerate(graph.outputs):
            if output is value:
                graph.outputs[index] = identity.outputs[0]
    value.replace_all_uses_with(replacement)
