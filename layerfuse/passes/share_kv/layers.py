"""The attention layers of a decoder graph as cache pairs: which cached keys and values one
attention reads, found by dataflow from the cache (never by names).

:func:`layerfuse.model.cache.paired_cache` gives every cached tensor with the node that
appends the new tokens to it. Keys and values differ in where that full tensor goes: keys
reach a ``MatMul`` whose product is normalised by a ``Softmax`` (the attention scores), values
reach the ``MatMul`` that reads those probabilities. The key and the value of one layer meet at
that ``Softmax``. Fused attention ops (onnxruntime's ``GroupQueryAttention``) take both in one
node, which is the layer.
"""

from __future__ import annotations

__all__ = ["KVLayer", "attention_nodes", "kv_layers"]

from collections import deque
from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.model.cache import PAST_SLOTS, CacheEntry, paired_cache

# How far (in nodes) a full key or value tensor may travel to its MatMul (repeat_kv's
# Unsqueeze/Expand/Reshape, a Transpose, casts), and scores to their Softmax (scale, mask).
_TO_MATMUL = 10
_TO_SOFTMAX = 6


@dataclass(frozen=True)
class KVLayer:
    """One attention layer's cache: its keys and values, in graph order."""

    index: int
    key: CacheEntry
    value: CacheEntry
    fused: bool  # one fused attention op reads both (GroupQueryAttention...)

    @property
    def entries(self) -> tuple[CacheEntry, CacheEntry]:
        return self.key, self.value


def _first_reached(start: ir.Value, op_types: set[str], limit: int) -> ir.Node | None:
    """The nearest node of ``op_types`` that reads ``start`` through at most ``limit`` nodes."""
    queue = deque([(start, 0)])
    seen: set[int] = set()
    while queue:
        value, depth = queue.popleft()
        for node, _ in value.uses():
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in op_types:
                return node
            if depth < limit:
                queue.extend((output, depth + 1) for output in node.outputs)
    return None


def _attention_softmax(entry: CacheEntry) -> tuple[str, ir.Node | None]:
    """("key", the Softmax of its scores) or ("value", the MatMul that reads it)."""
    full = entry.consumer.outputs[0]
    matmul = _first_reached(full, {"MatMul"}, _TO_MATMUL)
    if matmul is None:
        return "unknown", None
    softmax = _first_reached(matmul.outputs[0], {"Softmax"}, _TO_SOFTMAX)
    if softmax is not None:
        return "key", softmax
    return "value", matmul


def _fused_layers(entries: list[CacheEntry]) -> list[KVLayer]:
    by_node: dict[int, dict[int, CacheEntry]] = {}
    for entry in entries:
        slots = PAST_SLOTS[entry.consumer.op_type]
        slot = next(i for i, v in enumerate(entry.consumer.inputs) if v is entry.past)
        by_node.setdefault(id(entry.consumer), {})[slots.index(slot)] = entry
    return [
        KVLayer(index, pair[0], pair[1], fused=True)
        for index, pair in enumerate(by_node.values())
        if 0 in pair and 1 in pair
    ]


def kv_layers(model: ir.Model, where: str = "the model") -> list[KVLayer]:
    """Every attention layer's cached keys and values, or PlanError saying why not."""
    entries = paired_cache(model.graph, where)
    if not entries:
        raise PlanError(
            f"{where} has no KV cache: share-kv works on 'layerfuse export --kv-cache' graphs "
            f"and onnxruntime-genai builder graphs"
        )
    if all(entry.consumer.op_type in PAST_SLOTS for entry in entries):
        return _fused_layers(entries)
    keys: dict[int, CacheEntry] = {}
    values: list[tuple[CacheEntry, ir.Node]] = []
    for entry in entries:
        role, node = _attention_softmax(entry)
        if role == "key":
            keys[id(node)] = entry
        elif role == "value":
            values.append((entry, node))
        else:
            raise PlanError(f"{where}: cache input {entry.past.name} reaches no attention MatMul")
    layers = []
    for value, matmul in values:
        key = next((keys[id(n)] for n in _producers(matmul, _TO_SOFTMAX) if id(n) in keys), None)
        if key is None:
            raise PlanError(f"{where}: no attention scores read cache input {value.past.name}")
        layers.append((key, value))
    if len(layers) != len(keys):
        raise PlanError(f"{where}: {len(keys)} cached keys but {len(layers)} cached values pair up")
    return [KVLayer(index, key, value, fused=False) for index, (key, value) in enumerate(layers)]


def _producers(node: ir.Node, limit: int) -> list[ir.Node]:
    """Nodes that ``node`` reads from, through at most ``limit`` nodes."""
    found, frontier = [], [node]
    for _ in range(limit):
        upstream = [v.producer() for n in frontier for v in n.inputs if v is not None]
        frontier = [p for p in upstream if p is not None]
        found.extend(frontier)
    return found


def attention_nodes(layer: KVLayer) -> tuple[ir.Node, ir.Node]:
    """(the MatMul of queries and keys, the Softmax of its scores) of an unfused layer."""
    scores = _first_reached(layer.key.consumer.outputs[0], {"MatMul"}, _TO_MATMUL)
    role, softmax = _attention_softmax(layer.key)
    if scores is None or role != "key" or softmax is None:
        raise PlanError(f"no attention scores read cache input {layer.key.past.name}")
    return scores, softmax
