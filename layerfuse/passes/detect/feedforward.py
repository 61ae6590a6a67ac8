"""Find feed-forward sublayers: up-projection(s), an elementwise activation, a down-projection.

A down-projection is any linear layer whose input is computed, through elementwise ops only,
from the outputs of one linear layer (GELU/ReLU/SiLU FFs) or two linear layers reading the
same tensor (gated SwiGLU/GeGLU FFs). Requiring that closed elementwise region is what tells
an FF from attention (whose output projection reads a MatMul of two activations) or from the
LM head (which reads a norm's ReduceMean). The activation is named by the ops in the region,
so GELU written with Erf, with Tanh, or as a fused Gelu/FastGelu op are all recognised
(onnxruntime's ``QuickGelu`` by its ``alpha``: 1.0 is SiLU, 1.702 the quick GELU). The two
up-projections of a gated FF may be one fused projection cut in halves by Split/Slice
(Phi-3's ``gate_up_proj``; see :func:`~layerfuse.passes.linears.column_parts`).

Every candidate that is not an FF gets a reason (:class:`~layerfuse.passes.detect.result.Match`),
ranked by how far it got: the linear layers that are plainly something else (attention
projections, the LM head) fail at depth 0, near misses later.
"""

from __future__ import annotations

__all__ = ["FeedForward", "find_feedforwards", "match_feedforward", "scan_feedforwards"]

from dataclasses import dataclass, field

import onnx_ir as ir

from layerfuse.model.graph import VIEW_OPS, constant_array, consumers, is_constant, skip_views_up
from layerfuse.passes.detect.activations import ELEMENTWISE, activation_of, ff_kind
from layerfuse.passes.detect.relaxed import RelaxedLinear, relaxed_linears
from layerfuse.passes.detect.result import Match, Rejection, describe
from layerfuse.passes.linears import Linear, as_linear, column_parts

_MAX_REGION = 24
# Readers of a tensor's shape only; they survive any rewrite that keeps the tensor's shape.
_SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass
class FeedForward:
    """One FF sublayer. ``gate`` is None for ungated FFs; ``up`` is then the only input layer."""

    kind: str
    activation: str
    up: Linear
    gate: Linear | None
    down: Linear
    input: ir.Value
    region: tuple[ir.Node, ...]
    neuron_parameters: tuple[ir.Value, ...] = field(default=())

    @property
    def gated(self) -> bool:
        return self.gate is not None

    @property
    def pre_activation(self) -> ir.Value:
        """The tensor just before the nonlinearity: what merging aligns neurons on."""
        return (self.gate or self.up).output

    @property
    def hidden(self) -> ir.Value:
        """The tensor the down-projection reads (after the activation and gating)."""
        return self.down.input

    @property
    def output(self) -> ir.Value:
        return self.down.output

    @property
    def width(self) -> int:
        return self.up.out_features

    @property
    def model_dim(self) -> int:
        return self.up.in_features

    @property
    def linears(self) -> dict[str, Linear]:
        roles = {"up": self.up, "down": self.down}
        if self.gate is not None:
            roles = {"gate": self.gate, **roles}
        return roles

    @property
    def parameter_count(self) -> int:
        extra = sum(int(constant_array(v).size) for v in self.neuron_parameters)
        return sum(linear.parameter_count for linear in self.linears.values()) + extra

    @property
    def nodes(self) -> tuple[ir.Node, ...]:
        linears = self.linears.values()
        own = [lin.node for lin in linears]
        own += [lin.bias_node for lin in linears if lin.bias_node is not None]
        own += [lin.part_node for lin in linears if lin.part_node is not None]
        own += [node for lin in linears for node in _delta_nodes(lin)]
        return tuple(dict.fromkeys(own)) + self.region


def _delta_nodes(linear: Linear) -> tuple[ir.Node, ...]:
    """The nodes of a relaxed projection's own low-rank delta (none for a plain one)."""
    return linear.delta_nodes if isinstance(linear, RelaxedLinear) else ()


def _closed_region(
    down: Linear, linear_by_output: dict[ir.Value, Linear]
) -> Match[tuple[list[Linear], list[ir.Node]]]:
    """Nodes between the up-projections and ``down``, if they are all elementwise.

    A failure's depth is 1 when an activation was passed on the way (it looked like an FF),
    else 0 (an attention output projection, the LM head).
    """
    ups: list[Linear] = []
    region: list[ir.Node] = []
    stack = [down.input]
    seen: set[ir.Value] = set()
    while stack:
        value = stack.pop()
        if value in seen:
            continue
        seen.add(value)
        if value in linear_by_output:
            linear = linear_by_output[value]
            if linear not in ups:
                ups.append(linear)
            continue
        node = value.producer()
        depth = int(any(activation_of(n) for n in region))
        if node is None:
            return Match.fail(
                f"reads the graph input '{value.name}' through elementwise ops "
                "only, with no up-projection on the way",
                depth=depth,
            )
        if node.op_type not in ELEMENTWISE:
            return Match.fail(
                f"reads {describe(node)}, which is not elementwise (an FF's "
                "down-projection reads its up-projections through elementwise "
                "ops only)",
                node,
                depth,
            )
        if len(region) >= _MAX_REGION:
            return Match.fail(f"more than {_MAX_REGION} elementwise ops behind it", node, depth)
        if node not in region:
            region.append(node)
        data_inputs = node.inputs[:1] if node.op_type in VIEW_OPS else node.inputs
        stack.extend(v for v in data_inputs if v is not None and not is_constant(v))
    return Match.ok((ups, region))


def _outside_reader(ups: list[Linear], region: list[ir.Node], down: Linear) -> str | None:
    """A tensor inside the FF that is read from outside it (a rewrite would break that
    reader), described; None when the FF is self-contained.

    Shape readers are the exception: the TorchScript exporter computes every Reshape target
    from ``Shape`` of the tensor it reshapes.
    """
    inside = set(region) | {down.node, *_delta_nodes(down)}
    values = [v for node in region for v in node.outputs] + [up.output for up in ups]
    for value in values:
        if value.is_graph_output():
            return f"'{value.name}' inside the FF is a graph output"
        for user in consumers(value):
            if user not in inside and user.op_type not in _SHAPE_READERS:
                return f"'{value.name}' inside the FF is also read by {describe(user)}"
    return None


def _neuron_parameters(region: list[ir.Node], width: int) -> tuple[ir.Value, ...]:
    """Per-neuron constants inside the activation (e.g. the bias of a fused BiasGelu)."""
    found = []
    for node in region:
        for value in node.inputs:
            data = constant_array(value)
            if data is not None and data.size == width and data.shape[-1] == width:
                found.append(value)
    return tuple(dict.fromkeys(found))


def _check_ups(ups: list[Linear], region: list[ir.Node], down: Linear) -> Match[ir.Value]:
    """The FF's input if the up-projections fit ``down``; else why they do not."""
    if not 1 <= len(ups) <= 2:
        return Match.fail(
            f"reads {len(ups)} linear layers through elementwise ops; an FF "
            "has 1 up-projection (or 2: gate and up)",
            depth=1,
        )
    if not region:
        return Match.fail(
            f"reads {describe(ups[0].node)} directly, with no activation between them", depth=1
        )
    width, model_dim = down.in_features, down.out_features
    for up in ups:
        if up.out_features != width or up.in_features != model_dim:
            return Match.fail(
                f"{describe(up.node)} maps {up.in_features} -> {up.out_features} features, "
                f"but it maps {width} -> {model_dim}",
                up.node,
                2,
            )
    for up in ups:
        siblings = {lin.columns for lin in ups if lin.node is up.node}
        if up.columns is not None and sum(b - a for a, b in siblings) != up.stored_out_features:
            return Match.fail(
                f"reads only columns {up.columns[0]}-{up.columns[1]} of the "
                f"fused projection {describe(up.node)}",
                up.node,
                2,
            )
    inputs = {skip_views_up(up.input) for up in ups}
    if len(inputs) != 1:
        return Match.fail("its two up-projections read different tensors", ups[1].node, 2)
    reader = _outside_reader(ups, region, down)
    if reader is not None:
        return Match.fail(reader, depth=3)
    return Match.ok(inputs.pop())


def match_feedforward(down: Linear, linear_by_output: dict[ir.Value, Linear]) -> Match[FeedForward]:
    """``down`` as the down-projection of an FF sublayer, or why it is not one."""
    closed = _closed_region(down, linear_by_output)
    if not closed:
        return closed
    ups, region = closed.value
    checked = _check_ups(ups, region, down)
    if not checked:
        return checked
    kind = ff_kind(ups, region)
    if not kind:
        return kind
    name, activation, gate, up = kind.value
    return Match.ok(
        FeedForward(
            kind=name,
            activation=activation,
            up=up,
            gate=gate,
            down=down,
            input=checked.value,
            region=tuple(region),
            neuron_parameters=_neuron_parameters(region, down.in_features),
        )
    )


def scan_feedforwards(graph: ir.Graph) -> tuple[list[FeedForward], list[Rejection]]:
    """Every FF sublayer of ``graph`` (graph order of their down-projections), and why each
    other linear layer is not a down-projection."""
    linears = relaxed_linears([lin for node in graph if (lin := as_linear(node)) is not None])
    linear_by_output: dict[ir.Value, Linear] = {}
    for linear in linears:
        linear_by_output[linear.output] = linear
        linear_by_output[linear.node.outputs[0]] = linear
        for part in column_parts(linear):
            linear_by_output[part.output] = part
    found, rejected = [], []
    for linear in linears:
        match = match_feedforward(linear, linear_by_output)
        if match:
            found.append(match.value)
        else:
            rejected.append(match.rejection("FF", linear.node))
    return found, rejected


def find_feedforwards(graph: ir.Graph) -> list[FeedForward]:
    """Every FF sublayer of ``graph``, in graph order of their down-projections."""
    return scan_feedforwards(graph)[0]
