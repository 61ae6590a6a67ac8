"""Which initializers of a graph are trainable weights, and which are constants.

The interpreter turns every initializer into a tensor, but only some may change during
training: making ``eps``, ``0.5``, ``sqrt(2)``, a rotary ``inv_freq`` or a shape constant
trainable would change what the graph computes, not how well. The rule, by dataflow only
(never by names), on the graph with its functions inlined:

1. the weight and bias of a linear layer: a MatMul/Gemm reading a 2-D constant weight,
   directly or through Transpose/Cast/Identity, and the constant bias Add right after it
   (:func:`layerfuse.passes.linears.as_linear`);
2. the weight and bias of a Conv;
3. the scale and bias of a normalization, fused (``LayerNormalization``,
   ``RMSNormalization``, ``SimplifiedLayerNormalization``, ``Skip*``) or decomposed into
   ReduceMean/Pow/Sqrt arithmetic (:func:`layerfuse.passes.detect.norms.find_norm`);
4. embedding tables: the 2-D data input of a Gather (token, learned position and token-type
   embeddings).

Everything else stays a constant: scalars, integer and boolean tensors, anything read only
by shape arithmetic, position frequencies, and learned tensors the rule does not recognise
(a ViT's class token and position table, which an Add/Concat reads like any constant).
Only floating-point initializers qualify; Constant nodes are never trainable.
"""

from __future__ import annotations

__all__ = ["trainable_initializers"]

import onnx_ir as ir

from layerfuse.model.graph import constant_source, node_index
from layerfuse.passes.detect.norms import FUSED_NORM_OPS, SKIP_NORM_OPS, find_norm
from layerfuse.passes.linears import as_linear

_FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
)


def _initializer(value: ir.Value | None) -> ir.Value | None:
    """The floating-point initializer behind ``value`` (through Identity), if any."""
    source = constant_source(value)
    if source is None or source.const_value is None or not source.is_initializer():
        return None
    return source if source.const_value.dtype in _FLOAT_TYPES else None


def _norm_parameters(node: ir.Node, order: dict[ir.Node, int]) -> list[ir.Value | None]:
    """Scale and bias of the norm whose last node is ``node``, if it ends one."""
    if node.op_type in FUSED_NORM_OPS or node.op_type in SKIP_NORM_OPS:
        norm = find_norm(node.outputs[0], 0, order)
        return [] if norm is None else [norm.weight, norm.bias]
    if node.op_type not in ("Mul", "Add"):
        return []
    found = []
    for value in node.inputs:
        source = _initializer(value)
        if source is None or source.const_value.size < 2:
            continue
        norm = find_norm(node.outputs[0], int(source.const_value.size), order)
        if norm is not None:
            found += [v for v in (norm.weight, norm.bias) if v is value]
    return found


def _node_parameters(node: ir.Node, order: dict[ir.Node, int]) -> list[ir.Value | None]:
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type in ("MatMul", "Gemm"):
        linear = as_linear(node)
        return [] if linear is None else [linear.weight, linear.bias]
    if node.op_type == "Conv":
        return list(node.inputs[1:3])
    if node.op_type == "Gather":
        table = _initializer(node.inputs[0])
        return [table] if table is not None and len(table.shape) == 2 else []
    return _norm_parameters(node, order)


def trainable_initializers(graph: ir.Graph) -> set[str]:
    """Names of the initializers of ``graph`` (functions inlined) that training may change."""
    order = node_index(graph)
    names: set[str] = set()
    for node in graph:
        for value in _node_parameters(node, order):
            source = _initializer(value)
            if source is not None:
                names.add(source.name)
    return names
