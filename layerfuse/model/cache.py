"""The KV cache of a decoder graph: which inputs are past keys/values, which outputs continue
them, and their geometry, found by dataflow (never by names).

A past input is a 4-D float graph input ``[batch, kv_heads, past, head_dim]`` with a free
sequence axis that the graph reads as data where keys or values are appended: a ``Concat``
along the sequence axis (the torch exporters, Hugging Face's ``DynamicCache``) or a past slot
of an onnxruntime attention op (``GroupQueryAttention`` in onnxruntime-genai's builder
graphs). The present output that continues it is what that Concat or attention op makes of
it. Between them may sit ops that carry the tensor on without changing what it holds:
sliding-window layers (Gemma-2/3, Mistral, Qwen2, Cohere2...) export ``past -> Slice ->
Concat -> Slice -> present``, keeping only the window's last tokens, and exporters add casts,
transposes and reshapes. Names differ between exporters (``past_key_values.N.key``,
``past.N.k``...), the dataflow does not.

Geometry comes from the declared shape when it is concrete; builder graphs declare the head
size symbolically (``kv_cache_dim``), so it is read from the attention op instead: its heads
attributes and the width of the packed projection that feeds it.

:func:`paired_cache` is the one check that every cache input can be carried from step to
step; ``generate`` and ``export --kv-cache`` both run it, so they cannot disagree.
"""

from __future__ import annotations

__all__ = [
    "PAST_SLOTS",
    "CacheEntry",
    "cache_entries",
    "kv_bytes_per_token",
    "paired_cache",
]

from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.errors import DataError
from layerfuse.model.graph import constant_array, constant_source

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
    window: int | None = None  # the most tokens the present keeps (sliding-window layers)

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
    """A 4-D float input whose sequence axis is not fixed: what every cache input looks like."""
    if value.dtype not in _FLOAT_TYPES or value.shape is None or len(value.shape) != 4:
        return False
    return _concrete(value, 2) is None


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


# Ops that carry a cached tensor without changing what it holds, only its extent, layout or
# type: sliding-window layers slice the past before appending and the present after it.
_CARRIERS = frozenset(
    ("Identity", "Cast", "CastLike", "Slice", "Transpose", "Reshape", "Squeeze", "Unsqueeze")
)
_MAX_CARRIED = 8  # carrier ops in a row on either side of the append


def _carried(value: ir.Value) -> list[tuple[ir.Value, int | None]]:
    """``value`` and every value carrier ops make of it, with where its sequence axis went
    (None once a reshape hides it); breadth first, nearest first."""
    found, frontier = [(value, 2)], [(value, 2, 0)]
    while frontier:
        current, axis, depth = frontier.pop(0)
        for use in current.uses():
            node = use.node
            if node.op_type not in _CARRIERS or use.idx != 0 or depth >= _MAX_CARRIED:
                continue
            moved = axis
            if node.op_type == "Transpose" and axis is not None:
                perm = list(node.attributes.get_ints("perm", [3, 2, 1, 0]))
                moved = perm.index(axis) if axis in perm else None
            elif node.op_type in ("Reshape", "Squeeze", "Unsqueeze"):
                moved = None
            found.append((node.outputs[0], moved))
            frontier.append((node.outputs[0], moved, depth + 1))
    return found


def _present_of(value: ir.Value) -> tuple[ir.Value | None, int | None]:
    """The 4-D graph output that carries ``value`` on (the present), and the window a
    constant negative Slice of the sequence axis cuts it to, if any."""
    for carried, axis in _carried(value):
        if carried.is_graph_output() and carried.shape is not None and len(carried.shape) == 4:
            return carried, _window(value, carried, axis)
    return None, None


def _kept_tail(node: ir.Node, axis: int) -> int | None:
    """w when ``node`` is ``x[..., -w:, ...]`` on ``axis`` with constant bounds."""
    if node.op_type != "Slice" or len(node.inputs) < 4:
        return None
    begin, axes = constant_array(node.inputs[1]), constant_array(node.inputs[3])
    if begin is None or axes is None or begin.size != 1 or axes.size != 1:
        return None
    if int(begin.item()) >= 0 or int(axes.item()) % 4 != axis:
        return None
    return -int(begin.item())


def _window(start: ir.Value, end: ir.Value, axis: int | None) -> int | None:
    """The tokens a Slice on the carrier path from ``start`` to ``end`` keeps, if any."""
    while end is not start and axis is not None:
        node = end.producer()
        if node is None or not node.inputs:
            return None
        kept = _kept_tail(node, axis)
        if kept is not None:
            return kept
        end = node.inputs[0]
    return None


def _appends(node: ir.Node, slot: int, axis: int | None) -> bool:
    """Whether ``node`` appends new tokens to what it reads at ``slot`` (sequence on ``axis``)."""
    if node.op_type == "Concat":
        rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else 4
        concat_axis = node.attributes.get_int("axis", 0) % rank
        return concat_axis == axis if axis is not None else concat_axis != 0
    return slot in PAST_SLOTS.get(node.op_type, ())


def _append_of(past: ir.Value) -> tuple[ir.Node, int] | None:
    """The node that appends to ``past`` (a Concat or a fused attention op) and its slot."""
    for value, axis in _carried(past):
        for use in value.uses():
            if _appends(use.node, use.idx, axis):
                return use.node, use.idx
    return None


def _entry(past: ir.Value) -> CacheEntry | None:
    """The cache entry of ``past``, if the graph appends to it."""
    found = _append_of(past)
    if found is None:
        return None
    node, slot = found
    heads, head_dim = _concrete(past, 1), _concrete(past, 3)
    if node.op_type == "Concat":
        present, window = _present_of(node.outputs[0])
        for value in (present, *node.inputs):
            if value is not None and value.shape is not None and len(value.shape) == 4:
                heads = heads or _concrete(value, 1)
                head_dim = head_dim or _concrete(value, 3)
        return CacheEntry(past, present, node, heads, head_dim, window)
    output_index = 1 + PAST_SLOTS[node.op_type].index(slot)
    present, window = None, None
    if len(node.outputs) > output_index:
        present, window = _present_of(node.outputs[output_index])
    if heads is None or head_dim is None:
        fused_heads, fused_dim = _fused_geometry(node)
        heads, head_dim = heads or fused_heads, head_dim or fused_dim
    return CacheEntry(past, present, node, heads, head_dim, window)


def cache_entries(graph: ir.Graph) -> list[CacheEntry]:
    """Every KV-cache input of ``graph`` that the graph appends to, in graph-input order,
    with its present output where one continues it."""
    entries = (_entry(value) for value in graph.inputs if _is_past_candidate(value))
    return [entry for entry in entries if entry is not None]


def _problem(entry: CacheEntry | None, value: ir.Value) -> str | None:
    """Why the decode loop could not carry cache input ``value`` on, if it could not."""
    if entry is None:
        return f"'{value.name}' (nothing appends new tokens to it)"
    if entry.present is None:
        return f"'{value.name}' (no present output continues it)"
    if entry.heads is None or entry.head_dim is None:
        return f"'{value.name}' (its heads and head size are unknown)"
    return None


def paired_cache(graph: ir.Graph, where: str) -> list[CacheEntry]:
    """Every cache input of ``graph`` with the present that continues it, or one line naming
    those that cannot be carried from step to step (the loop could feed them nothing right).
    Generation and the export's own check both run this, so an export that passes its check
    is one that ``generate`` can run."""
    candidates = [value for value in graph.inputs if _is_past_candidate(value)]
    entries = {entry.past: entry for entry in cache_entries(graph)}
    problems = [_problem(entries.get(value), value) for value in candidates]
    problems = [problem for problem in problems if problem is not None]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise DataError(
            f"{where}: {len(problems)} of {len(candidates)} KV-cache inputs cannot be carried "
            f"from step to step: {', '.join(problems[:3])}{more}"
        )
    return list(entries.values())


def kv_bytes_per_token(entries: list[CacheEntry]) -> int:
    """Cache bytes one token of one sequence occupies across all layers."""
    return sum(entry.bytes_per_token() for entry in entries)
