"""The KV cache of a decoder graph: which inputs are past keys/values, which outputs continue
them, and their geometry, found by dataflow (never by names).

A past input is a 4-D float graph input ``[batch, kv_heads, past, head_dim]`` that the graph
reads as data where keys or values are appended: a ``Concat`` along the sequence axis (the
torch exporters, Hugging Face's ``DynamicCache``) or a past slot of an onnxruntime attention
op (``GroupQueryAttention`` in onnxruntime-genai's builder graphs). The present output that
continues it is that Concat's output, or the attention op's matching present output. Names
differ between exporters (``past_key_values.N.key``, ``past.N.k``...), the dataflow does not.

Geometry comes from the declared shape when it is concrete; builder graphs declare the head
size symbolically (``kv_cache_dim``), so it is read from the attention op instead: its heads
attributes and the width of the packed projection that feeds it.
"""

from __future__ import annotations

__all__ = ["PAST_SLOTS", "CacheEntry", "cache_entries", "kv_bytes_per_token"]

from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.model.graph import constant_source

# Fused attention op -> input slots of (past key, past value); presents are outputs 1 and 2.
PAST_SLOTS = {
    "GroupQueryAttention": (3, 4),
    "MultiHeadAttention": (6, 7),
    "DecoderMaskedMultiHeadAttention": (5, 6),
}
_FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)


@dataclass(frozen=True)
class CacheEntry:
    """One cached tensor (a layer's keys or values): its past input and present output."""

    past: ir.Value
    present: ir.Value | None
    consumer: ir.Node
    heads: int | None
    head_dim: int | None

    @property
    def dtype(self) -> ir.DataType:
        return self.past.dtype

    def bytes_per_token(self) -> int:
        """Bytes one token of one sequence adds to this tensor."""
        if self.heads is None or self.head_dim is None:
            raise ValueError(f"the geometry of cache input {self.past.name} is unknown")
        return self.heads * self.head_dim * int(self.dtype.itemsize)


def _concrete(value: ir.Value, axis: int) -> int | None:
    shape = value.shape
    if shape is None or len(shape) <= abs(axis):
        return None
    dim = shape[axis]
    return dim if isinstance(dim, int) else None


def _is_past_candidate(value: ir.Value) -> bool:
    return value.dtype in _FLOAT_TYPES and value.shape is not None and len(value.shape) == 4


def _width(value: ir.Value | None) -> int | None:
    """The last dimension of ``value``: declared, or read from the linear layer making it."""
    if value is None:
        return None
    declared = _concrete(value, -1)
    if declared is not None:
        return declared
    node = value.producer()
    if node is None:
        return None
    if node.op_type == "MatMulNBits":
        return node.attributes.get_int("N")
    if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
        weight = constant_source(node.inputs[1])
        if weight is not None and weight.shape is not None and len(weight.shape) == 2:
            transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
            return int(weight.shape[0] if transposed else weight.shape[1])
    if node.op_type in ("Add", "Identity", "Cast"):
        widths = [_width(v) for v in node.inputs if v is not None and not v.is_graph_input()]
        return next((w for w in widths if w is not None), None)
    return None


def _fused_geometry(node: ir.Node) -> tuple[int | None, int | None]:
    """(kv heads, head size) of a fused attention op, from its attributes and input widths."""
    heads = node.attributes.get_int("num_heads")
    kv_heads = node.attributes.get_int("kv_num_heads", heads)
    if heads is None or kv_heads is None:
        return kv_heads, None
    key = node.inputs[1] if len(node.inputs) > 1 else None
    if key is not None:
        width = _width(key)
        return kv_heads, None if width is None else width // kv_heads
    width = _width(node.inputs[0])
    return kv_heads, None if width is None else width // (heads + 2 * kv_heads)


def _graph_output_of(value: ir.Value) -> ir.Value | None:
    """``value`` itself, or the Identity copy of it, when that is a graph output."""
    if value.is_graph_output():
        return value
    for use in value.uses():
        if use.node.op_type == "Identity":
            found = _graph_output_of(use.node.outputs[0])
            if found is not None:
                return found
    return None


def _entry(past: ir.Value, node: ir.Node, slot: int) -> CacheEntry | None:
    """The cache entry of ``past`` read by ``node`` at input ``slot``, if that appends to it."""
    heads, head_dim = _concrete(past, 1), _concrete(past, 3)
    if node.op_type == "Concat" and node.attributes.get_int("axis") in (2, -2):
        present = _graph_output_of(node.outputs[0])
        if heads is None or head_dim is None:
            for value in (present, *node.inputs):
                if value is not None and value.shape is not None and len(value.shape) == 4:
                    heads = heads or _concrete(value, 1)
                    head_dim = head_dim or _concrete(value, 3)
        return CacheEntry(past, present, node, heads, head_dim)
    slots = PAST_SLOTS.get(node.op_type)
    if slots is None or slot not in slots:
        return None
    output_index = 1 + slots.index(slot)
    present = None
    if len(node.outputs) > output_index:
        present = _graph_output_of(node.outputs[output_index])
    if heads is None or head_dim is None:
        fused_heads, fused_dim = _fused_geometry(node)
        heads, head_dim = heads or fused_heads, head_dim or fused_dim
    return CacheEntry(past, present, node, heads, head_dim)


def cache_entries(graph: ir.Graph) -> list[CacheEntry]:
    """Every KV-cache input of ``graph`` with its present output, in graph-input order."""
    found = []
    for value in graph.inputs:
        if not _is_past_candidate(value):
            continue
        for use in value.uses():
            entry = _entry(value, use.node, use.idx)
            if entry is not None:
                found.append(entry)
                break
    return found


def kv_bytes_per_token(entries: list[CacheEntry]) -> int:
    """Cache bytes one token of one sequence occupies across all layers."""
    return sum(entry.bytes_per_token() for entry in entries)
