"""Fold an :class:`~layerfuse.passes.share_kv.align.Alignment` into the borrowing layer's
query and output projections (see :mod:`.align` for why that is exact for the maps fitted).

The layer's attention sublayer is the detected one whose Softmax scores its keys; its query
projection is the one of its projections that the scores' query side is computed from.
"""

from __future__ import annotations

__all__ = ["fold_alignment", "mapped_outputs", "turned_queries"]

from collections import deque

import numpy as np
import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.passes.detect import ModelStructure
from layerfuse.passes.linears import Linear
from layerfuse.passes.share_kv.align import Alignment, rotary_pairs
from layerfuse.passes.share_kv.layers import KVLayer, attention_nodes

_UPSTREAM = 24  # nodes from the scores back to the query projection (rotary, reshapes, scale)


def _query_projection(scores: ir.Node, projections: tuple[Linear, ...]) -> Linear | None:
    by_node = {id(p.bias_node or p.node): p for p in projections}
    by_node |= {id(p.node): p for p in projections}
    queue, seen = deque([(scores.inputs[0], 0)]), set()
    while queue:
        value, depth = queue.popleft()
        node = None if value is None else value.producer()
        if node is None or id(node) in seen or depth > _UPSTREAM:
            continue
        seen.add(id(node))
        if id(node) in by_node:
            return by_node[id(node)]
        queue.extend((v, depth + 1) for v in node.inputs)
    return None


def _projections(structure: ModelStructure, layer: KVLayer) -> tuple[Linear, Linear]:
    scores, softmax = attention_nodes(layer)
    attention = next(
        (b.attention for b in structure.blocks if b.attention and b.attention.core is softmax),
        None,
    )
    query = None if attention is None else _query_projection(scores, attention.projections)
    if attention is None or query is None:
        raise PlanError(
            f"KV layer {layer.index}: its attention's query and output projections were not "
            f"found, so the alignment cannot be folded in (share without --align)"
        )
    output = attention.output_projection
    if query.columns is not None or output.columns is not None:
        raise PlanError(
            f"KV layer {layer.index}: a fused query projection cannot take the alignment alone "
            f"(share without --align)"
        )
    return query, output


def turned_queries(matrix: np.ndarray, alignment: Alignment, head_dim: int) -> np.ndarray:
    """Each query head's rotary pairs multiplied by ``conj(m)`` of its KV head; ``matrix``'s
    last axis holds the heads' dimensions."""
    real, imaginary = rotary_pairs(head_dim, alignment.convention)
    kv_heads = alignment.key_scale.shape[0]
    heads = matrix.shape[-1] // head_dim
    out = matrix.astype(np.float64).copy()
    for head in range(heads):
        m = alignment.key_scale[head // (heads // kv_heads)]
        re, im = head * head_dim + real, head * head_dim + imaginary
        a, b = m.real, m.imag
        out[..., re] = a * matrix[..., re] + b * matrix[..., im]
        out[..., im] = a * matrix[..., im] - b * matrix[..., re]
    return out


def mapped_outputs(matrix: np.ndarray, alignment: Alignment, head_dim: int) -> np.ndarray:
    """Each query head's rows of the output projection multiplied by ``N^T`` of its KV head."""
    kv_heads = alignment.value_map.shape[0]
    heads = matrix.shape[0] // head_dim
    out = matrix.astype(np.float64).copy()
    for head in range(heads):
        rows = slice(head * head_dim, (head + 1) * head_dim)
        out[rows] = alignment.value_map[head // (heads // kv_heads)].T @ matrix[rows]
    return out


def fold_alignment(
    graph: ir.Graph, structure: ModelStructure, layer: KVLayer, alignment: Alignment
) -> None:
    """Give ``layer``'s query and output projections new weights holding the alignment."""
    query, output = _projections(structure, layer)
    head_dim = layer.key.head_dim
    if query.out_features % head_dim or output.in_features != query.out_features:
        raise PlanError(f"KV layer {layer.index}: projection widths do not split into heads")
    tape = ir.tape.Tape(graph)
    prefix = f"share_kv.aligned{layer.index}"
    turned = turned_queries(query.read_weight(), alignment, head_dim)
    weight = tape.initializer(query.consumed_weight_tensor(turned, f"{prefix}.query.weight"))
    query.node.replace_input_with(1, weight)
    bias = query.read_bias()
    if bias is not None:
        new_bias = turned_queries(bias[None, :], alignment, head_dim)[0]
        node, slot = query.bias_input_index()
        node.replace_input_with(
            slot, tape.initializer(query.bias_tensor(new_bias, f"{prefix}.query.bias"))
        )
    mapped = mapped_outputs(output.read_weight(), alignment, head_dim)
    weight = tape.initializer(output.consumed_weight_tensor(mapped, f"{prefix}.output.weight"))
    output.node.replace_input_with(1, weight)
