"""Remove the KV cache of removed attention sublayers: their past inputs and present outputs.

A decoder graph keeps each attention sublayer's keys and values alive through graph outputs
(the presents), so bypassing the sublayer alone would leave its K/V projections computing a
cache nobody reads, and the caller would still have to feed and carry it. Which cache
belongs to which sublayer is found by dataflow: the attention's *region* is every node from
its projections to its output projection (walking up from the core and the nodes between the
core and the output projection, stopping at linear layers, shape computations and constants),
and its cache entries are those whose Concat or fused attention op lies in that region.

After the presents are dropped and dead nodes removed, a past input may still be read for its
shape only (torch exports read the past length from one arbitrary layer's cache); those reads
move to a cache input that stays. The remaining cache inputs and outputs are then renumbered
consecutively (``past_key_values.3.key`` -> ``past_key_values.2.key`` when layer 2's cache
went), the convention onnxruntime-genai's ``%d`` name templates and layer count rely on.
"""

from __future__ import annotations

__all__ = ["attention_cache", "remove_attention_cache"]

import re
from collections import deque

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.cache import CacheEntry, cache_entries
from layerfuse.model.graph import consumers, is_constant
from layerfuse.passes.detect import Attention
from layerfuse.passes.linears import as_linear

_MAX_REGION = 5000
# Dimensions every cache tensor shares: batch and past length.
_SHARED_AXES = {0, 2}
_INDEXED = re.compile(r"^(\D*)(\d+)(.*)$")


def _interior(attention: Attention) -> list[ir.Node]:
    """The core and the nodes between it and the output projection."""
    stop = attention.output_projection.node
    found, frontier = [attention.core], list(attention.core.outputs)
    while frontier:
        for node in consumers(frontier.pop()):
            if node is not stop and node not in found and len(found) < _MAX_REGION:
                found.append(node)
                frontier.extend(node.outputs)
    return found


def _region(attention: Attention) -> set[ir.Node]:
    region = set(_interior(attention))
    queue = deque(v for node in region for v in node.inputs if v is not None)
    while queue and len(region) < _MAX_REGION:
        value = queue.popleft()
        node = value.producer()
        if node is None or node in region or is_constant(value) or node.op_type == "Shape":
            continue
        if as_linear(node) is not None:
            continue
        region.add(node)
        queue.extend(v for v in node.inputs if v is not None)
    return region


def attention_cache(graph: ir.Graph, attention: Attention) -> list[CacheEntry]:
    """The cache entries (keys, values) that ``attention`` appends to."""
    region = _region(attention)
    return [entry for entry in cache_entries(graph) if entry.consumer in region]


def _selected_axes(node: ir.Node, rank: int) -> set[int]:
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", rank)
    return set(range(rank)[slice(start, end)])


def _move_shape_reads(entry: CacheEntry, survivors: list[CacheEntry]) -> None:
    """Point reads of ``entry.past`` that only take its shape at a surviving cache input."""
    for use in list(entry.past.uses()):
        node = use.node
        substitute = None
        if node.op_type == "Shape":
            axes = _selected_axes(node, 4)
            substitute = next(
                (
                    s.past
                    for s in survivors
                    if axes <= _SHARED_AXES
                    or (s.heads, s.head_dim) == (entry.heads, entry.head_dim)
                ),
                None,
            )
        if substitute is None:
            raise PlanError(
                f"cache input '{entry.past.name}' is still read by {node.op_type} "
                f"'{node.name}' after its attention was removed"
            )
        node.replace_input_with(use.idx, substitute)


def _renumber(entries: list[CacheEntry]) -> None:
    """Rename cache inputs/outputs to consecutive layer numbers, if their names carry one."""
    parsed = []
    for entry in entries:
        values = [entry.past] + ([entry.present] if entry.present is not None else [])
        matches = [_INDEXED.match(v.name or "") for v in values]
        if not all(matches) or len({int(m.group(2)) for m in matches}) != 1:
            return
        parsed.append((int(matches[0].group(2)), values, matches))
    numbers = {old: new for new, old in enumerate(sorted({p[0] for p in parsed}))}
    for old, values, matches in sorted(parsed, key=lambda p: p[0]):
        for value, match in zip(values, matches, strict=True):
            value.name = f"{match.group(1)}{numbers[old]}{match.group(3)}"


def remove_attention_cache(model: ir.Model, attentions: list[Attention]) -> int:
    """Drop the cache I/O of ``attentions`` (still in the graph, already bypassed).

    Returns how many cache tensors went. Their K/V computation is removed as dead code.
    """
    graph = model.graph
    doomed = [entry for attention in attentions for entry in attention_cache(graph, attention)]
    if not doomed:
        return 0
    gone = {entry.past for entry in doomed}
    for entry in doomed:
        if entry.present is not None:
            graph.outputs.remove(entry.present)
    common_passes.RemoveUnusedNodesPass()(model)
    survivors = [entry for entry in cache_entries(graph) if entry.past not in gone]
    for entry in doomed:
        _move_shape_reads(entry, survivors)
        graph.inputs.remove(entry.past)
    _renumber(survivors)
    return len(doomed)
