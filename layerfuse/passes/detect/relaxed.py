"""Relaxed projections: a linear layer plus its own low-rank delta, ``x W + (x A) B``.

A relaxed tie (``layerfuse merge --relax-rank``) leaves each shared MatMul/Gemm reading the
one shared weight and adds beside it a MatMul pair reading the same input, whose output an
Add sums with the projection's (before a separate bias Add, or after it). Seen one node at a
time those are three linear layers, and an FF's elementwise region would appear to read four
up-projections; so before FFs are matched, each such triple is folded into one
:class:`RelaxedLinear`, found by dataflow alone (no names): the delta's two MatMuls disappear
from the list of linear layers, a bias Add behind the delta's Add is the projection's bias,
and the projection's output is whichever of the two Adds comes last.
"""

from __future__ import annotations

__all__ = ["RelaxedLinear", "relaxed_linears"]

from dataclasses import dataclass, fields

import onnx_ir as ir

from layerfuse.model.graph import consumers
from layerfuse.passes.linears import Linear
from layerfuse.passes.linears import _matmul_bias as matmul_bias


@dataclass
class RelaxedLinear(Linear):
    """A projection whose result is its own output plus ``delta_out(delta_in(input))``."""

    delta_in: Linear | None = None
    delta_out: Linear | None = None
    delta_add: ir.Node | None = None
    # Whether the bias Add reads the delta's Add (else it is before it, or there is none).
    bias_after_delta: bool = False

    @property
    def full_output(self) -> ir.Value:
        assert self.delta_add is not None
        last = self.bias_node if self.bias_after_delta else self.delta_add
        assert last is not None
        return last.outputs[0]

    @property
    def relax_rank(self) -> int:
        assert self.delta_in is not None
        return self.delta_in.out_features

    @property
    def delta_nodes(self) -> tuple[ir.Node, ...]:
        assert self.delta_in is not None and self.delta_out is not None
        assert self.delta_add is not None
        return (self.delta_in.node, self.delta_out.node, self.delta_add)

    @property
    def parameter_count(self) -> int:
        """The projection's parameters plus its delta's; of a fused projection's delta, ``A``
        is counted with the first column range and each range counts its own columns of ``B``."""
        owns_a = self.columns is None or self.columns[0] == 0
        delta = self.relax_rank * (self.out_features + (self.in_features if owns_a else 0))
        return super().parameter_count + delta


def _plain(linear: Linear | None, reader: ir.Node) -> bool:
    """A bias-free MatMul whose only reader is ``reader``."""
    if linear is None or linear.node.op_type != "MatMul" or linear.bias is not None:
        return False
    output = linear.node.outputs[0]
    return not output.is_graph_output() and consumers(output) == [reader]


def _relaxed(linear: Linear, by_node: dict[ir.Node, Linear]) -> RelaxedLinear | None:
    """``linear`` with the delta summed onto its output, or None when it has none."""
    output = linear.full_output
    users = consumers(output)
    if output.is_graph_output() or len(users) != 1 or users[0].op_type != "Add":
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    delta_out = by_node.get(other.producer()) if other is not None else None
    if delta_out is None or not _plain(delta_out, add):
        return None
    delta_in = by_node.get(delta_out.input.producer())
    if delta_in is None or not _plain(delta_in, delta_out.node):
        return None
    if (
        delta_in.input is not linear.input
        or delta_in.out_features != delta_out.in_features
        or delta_out.out_features != linear.stored_out_features
    ):
        return None
    own = {field.name: getattr(linear, field.name) for field in fields(linear)}
    relaxed = RelaxedLinear(**own, delta_in=delta_in, delta_out=delta_out, delta_add=add)
    bias = None
    if linear.node.op_type == "MatMul" and linear.bias is None:
        bias = matmul_bias(add.outputs[0], linear.stored_out_features)
    if bias is not None:
        relaxed.bias, relaxed.bias_node = bias
        relaxed.bias_after_delta = True
    return relaxed


def relaxed_linears(linears: list[Linear]) -> list[Linear]:
    """``linears`` with every relaxed projection folded into one :class:`RelaxedLinear`."""
    by_node = {linear.node: linear for linear in linears}
    folded: dict[ir.Node, RelaxedLinear] = {}
    for linear in linears:
        relaxed = _relaxed(linear, by_node)
        if relaxed is not None:
            folded[linear.node] = relaxed
    absorbed = {node for relaxed in folded.values() for node in relaxed.delta_nodes}
    return [folded.get(lin.node, lin) for lin in linears if lin.node not in absorbed]
