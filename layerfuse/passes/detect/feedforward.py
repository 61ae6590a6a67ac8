"""Find feed-forward sublayers: up-projection(s), an elementwise activation, a down-projection.

A down-projection is any linear layer whose input is computed, through elementwise ops only,
from the outputs of one linear layer (GELU/ReLU/SiLU FFs) or two linear layers reading the
same tensor (gated SwiGLU/GeGLU FFs). Requiring that closed elementwise region is what tells
an FF from attention (whose output projection reads a MatMul of two activations) or from the
LM head (which reads a norm's ReduceMean). The activation is named by the ops in the region,
so GELU written with Erf, with Tanh, or as a fused Gelu/FastGelu op are all recognised.
"""

from __future__ import annotations

__all__ = ["ACTIVATION_OPS", "FeedForward", "find_feedforwards"]

from dataclasses import dataclass, field

import onnx_ir as ir

from layerfuse.model.graph import VIEW_OPS, constant_array, consumers, is_constant, skip_views_up
from layerfuse.passes.linears import Linear, as_linear

# Op type (any domain) -> activation it implies.
ACTIVATION_OPS = {
    "Erf": "gelu",
    "Gelu": "gelu",
    "BiasGelu": "gelu",
    "Tanh": "gelu_tanh",
    "FastGelu": "gelu_tanh",
    "QuickGelu": "gelu_quick",
    "Sigmoid": "silu",
    "Swish": "silu",
    "Relu": "relu",
}
_ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Cast", "Softplus", "Clip"}
    | set(ACTIVATION_OPS)
    | VIEW_OPS
)
_GATED_KIND = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu"}
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
        own = [self.up.node, self.down.node]
        if self.gate is not None:
            own.append(self.gate.node)
        own += [lin.bias_node for lin in self.linears.values() if lin.bias_node is not None]
        return tuple(own) + self.region


def _reaches_activation(start: ir.Value, region: set[ir.Node]) -> bool:
    stack = [start]
    seen: set[int] = set()
    while stack:
        value = stack.pop()
        for node in consumers(value):
            if node not in region or id(node) in seen:
                continue
            seen.add(id(node))
            if node.op_type in ACTIVATION_OPS:
                return True
            stack.extend(node.outputs)
    return False


def _closed_region(
    down: Linear, linear_by_output: dict[ir.Value, Linear]
) -> tuple[list[Linear], list[ir.Node]] | None:
    """Nodes between the up-projections and ``down``, if they are all elementwise."""
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
        if node is None or node.op_type not in _ELEMENTWISE or len(region) >= _MAX_REGION:
            return None
        if node not in region:
            region.append(node)
        data_inputs = node.inputs[:1] if node.op_type in VIEW_OPS else node.inputs
        stack.extend(v for v in data_inputs if v is not None and not is_constant(v))
    return ups, region


def _is_self_contained(ups: list[Linear], region: list[ir.Node], down: Linear) -> bool:
    """No tensor inside the FF may be read from outside it (a rewrite would break that reader).

    Shape readers are the exception: the TorchScript exporter computes every Reshape target
    from ``Shape`` of the tensor it reshapes.
    """
    inside = set(region) | {down.node}

    def private(value: ir.Value) -> bool:
        return not value.is_graph_output() and all(
            user in inside or user.op_type in _SHAPE_READERS for user in consumers(value)
        )

    return all(private(v) for node in region for v in node.outputs) and all(
        private(up.output) for up in ups
    )


def _neuron_parameters(region: list[ir.Node], width: int) -> tuple[ir.Value, ...]:
    """Per-neuron constants inside the activation (e.g. the bias of a fused BiasGelu)."""
    found = []
    for node in region:
        for value in node.inputs:
            data = constant_array(value)
            if data is not None and data.size == width and data.shape[-1] == width:
                found.append(value)
    return tuple(dict.fromkeys(found))


def _as_feedforward(down: Linear, linear_by_output: dict[ir.Value, Linear]) -> FeedForward | None:
    closed = _closed_region(down, linear_by_output)
    if closed is None:
        return None
    ups, region = closed
    if not 1 <= len(ups) <= 2 or not region:
        return None
    width, model_dim = down.in_features, down.out_features
    if any(up.out_features != width or up.in_features != model_dim for up in ups):
        return None
    inputs = {skip_views_up(up.input) for up in ups}
    if len(inputs) != 1 or not _is_self_contained(ups, region, down):
        return None
    activations = {
        ACTIVATION_OPS[node.op_type] for node in region if node.op_type in ACTIVATION_OPS
    }
    if len(activations) != 1:
        return None
    activation = activations.pop()
    region_set = set(region)
    if len(ups) == 1:
        gate, up, kind = None, ups[0], activation
    else:
        gating = [_reaches_activation(up.output, region_set) for up in ups]
        if sum(gating) != 1 or activation not in _GATED_KIND:
            return None
        gate, up = (ups[0], ups[1]) if gating[0] else (ups[1], ups[0])
        kind = _GATED_KIND[activation]
    return FeedForward(
        kind=kind,
        activation=activation,
        up=up,
        gate=gate,
        down=down,
        input=inputs.pop(),
        region=tuple(region),
        neuron_parameters=_neuron_parameters(region, width),
    )


def find_feedforwards(graph: ir.Graph) -> list[FeedForward]:
    """Every FF sublayer of ``graph``, in graph order of their down-projections."""
    linears = [linear for node in graph if (linear := as_linear(node)) is not None]
    linear_by_output: dict[ir.Value, Linear] = {}
    for linear in linears:
        linear_by_output[linear.output] = linear
        linear_by_output[linear.node.outputs[0]] = linear
    found = []
    for linear in linears:
        ff = _as_feedforward(linear, linear_by_output)
        if ff is not None:
            found.append(ff)
    return found
