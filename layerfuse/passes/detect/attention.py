"""Find attention sublayers: a Softmax (or a fused attention op) between projections.

From each core the search runs downstream to the first linear layer that reads the attended
values (the output projection) and upstream to the linear layers that produce queries, keys
and values. Shape computations are not followed upstream: they lead back into earlier layers
through ``Shape`` nodes and carry no attention weights.
"""

from __future__ import annotations

__all__ = ["FUSED_ATTENTION_OPS", "Attention", "find_attentions", "scan_attentions"]

from collections import Counter, deque
from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.model.graph import consumers, is_constant, skip_views_up
from layerfuse.passes.detect.result import Match, Rejection
from layerfuse.passes.linears import Linear, as_linear

FUSED_ATTENTION_OPS = frozenset(
    {
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedAttention",
        "PackedMultiHeadAttention",
        "SparseAttention",
        "DecoderMaskedMultiHeadAttention",
        "DecoderMaskedSelfAttention",
        "PagedAttention",
    }
)
_MAX_DOWNSTREAM = 16
_MAX_UPSTREAM = 400


@dataclass
class Attention:
    """One attention sublayer: its core node, projections and the tensor it attends over."""

    core: ir.Node
    projections: tuple[Linear, ...]
    output_projection: Linear
    input: ir.Value | None

    @property
    def kind(self) -> str:
        return "softmax" if self.core.op_type == "Softmax" else self.core.op_type

    @property
    def output(self) -> ir.Value:
        return self.output_projection.output

    @property
    def parameter_count(self) -> int:
        return sum(linear.parameter_count for linear in (*self.projections, self.output_projection))


def _output_projection(core: ir.Node) -> tuple[Linear, list[ir.Node]] | None:
    """The first linear downstream of ``core`` and the nodes passed on the way."""
    frontier = list(core.outputs)
    interior: list[ir.Node] = []
    for _ in range(_MAX_DOWNSTREAM):
        next_frontier = []
        for value in frontier:
            for node in consumers(value):
                linear = as_linear(node)
                if linear is not None and node.inputs[0] is value:
                    return linear, interior
                if node not in interior:
                    interior.append(node)
                    next_frontier.extend(node.outputs)
        if not next_frontier:
            return None
        frontier = next_frontier
    return None


def _upstream_projections(starts: list[ir.Node], stop: set[ir.Node]) -> list[Linear]:
    """Linear layers upstream of ``starts``, nearest first (breadth-first, bounded)."""
    found: list[Linear] = []
    queue = deque(v for node in starts for v in node.inputs if v is not None)
    seen: set[ir.Value] = set()
    visited = 0
    while queue and visited < _MAX_UPSTREAM:
        value = queue.popleft()
        if value in seen or is_constant(value):
            continue
        seen.add(value)
        node = value.producer()
        if node is None or node in stop or node.op_type == "Shape":
            continue
        visited += 1
        linear = as_linear(node)
        if linear is None and node.op_type == "Add":
            linear = next(
                (
                    lin
                    for v in node.inputs
                    if v is not None
                    and v.producer() is not None
                    and (lin := as_linear(v.producer())) is not None
                    and lin.bias_node is node
                ),
                None,
            )
        if linear is not None:
            if all(existing.node is not linear.node for existing in found):
                found.append(linear)
            continue
        queue.extend(v for v in node.inputs if v is not None)
    return found


def _attention_at(core: ir.Node, stop: set[ir.Node]) -> Match[Attention]:
    downstream = _output_projection(core)
    if downstream is None:
        return Match.fail(
            f"no linear layer reads its result within {_MAX_DOWNSTREAM} steps (an attention "
            "sublayer ends in an output projection)",
            core,
        )
    output_projection, interior = downstream
    candidates = _upstream_projections([core, *interior], stop | {output_projection.node})
    if not candidates:
        return Match.ok(Attention(core, (), output_projection, None))
    by_input = Counter(skip_views_up(linear.input) for linear in candidates)
    shared_input, _ = by_input.most_common(1)[0]
    projections = tuple(lin for lin in candidates if skip_views_up(lin.input) is shared_input)
    return Match.ok(Attention(core, projections, output_projection, shared_input))


def scan_attentions(
    graph: ir.Graph, feedforward_nodes: set[ir.Node]
) -> tuple[list[Attention], list[Rejection]]:
    """Every attention sublayer of ``graph`` in graph order (FF nodes bound the search), and
    why each other Softmax is not one."""
    found, rejected = [], []
    for node in graph:
        if node.op_type == "Softmax" or node.op_type in FUSED_ATTENTION_OPS:
            match = _attention_at(node, feedforward_nodes)
            if match:
                found.append(match.value)
            else:
                rejected.append(match.rejection("attention", node))
    return found, rejected


def find_attentions(graph: ir.Graph, feedforward_nodes: set[ir.Node]) -> list[Attention]:
    """Every attention sublayer of ``graph`` in graph order; FF nodes bound the search."""
    return scan_attentions(graph, feedforward_nodes)[0]
