"""Small graph queries shared by detection and the rewriting passes.

Exporters wrap the interesting tensors in shape plumbing (GPT-2's Conv1D flattens to 2-D
around every Gemm, the TorchScript exporter inserts Casts and Identities). These helpers look
through that plumbing so that the detectors can reason about the dataflow that matters.
"""

from __future__ import annotations

__all__ = [
    "VIEW_OPS",
    "bypass",
    "constant_array",
    "constant_source",
    "consumers",
    "is_constant",
    "node_index",
    "nodes_by_name",
    "producer",
    "skip_views_down",
    "skip_views_up",
    "values_by_name",
]

from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

# Ops that change only how a tensor is viewed; their data input is input 0.
VIEW_OPS = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def producer(value: ir.Value | None) -> ir.Node | None:
    return None if value is None else value.producer()


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


def values_by_name(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the graph: inputs, initializers and node outputs."""
    table: dict[str, ir.Value] = {}
    for value in graph.inputs:
        table[value.name] = value
    for name, value in graph.initializers.items():
        table[name] = value
    for node in graph:
        for value in node.outputs:
            if value.name:
                table[value.name] = value
    return table


def nodes_by_name(nodes: Iterable[ir.Node]) -> dict[str, ir.Node]:
    return {node.name: node for node in nodes if node.name}


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
