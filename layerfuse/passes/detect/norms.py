"""Find normalizations (fused or decomposed) and describe residual Adds.

Norms arrive fused (``LayerNormalization``, ``RMSNormalization``, ORT's
``SimplifiedLayerNormalization`` and ``Skip*`` variants) or decomposed into ReduceMean/Pow/
Sqrt arithmetic with Casts sprinkled in by the TorchScript exporter. Both are recognised by
dataflow, never by initializer names.
"""

from __future__ import annotations

__all__ = [
    "FUSED_NORM_OPS",
    "SKIP_NORM_OPS",
    "Norm",
    "Residual",
    "find_norm",
    "same_tensor",
]

from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.model.graph import constant_array, is_constant, skip_views_up

FUSED_NORM_OPS = {
    "LayerNormalization": "layer",
    "RMSNormalization": "rms",
    "SimplifiedLayerNormalization": "rms",
}
SKIP_NORM_OPS = {
    "SkipLayerNormalization": "layer",
    "SkipSimplifiedLayerNormalization": "rms",
}
_NORM_ARITHMETIC = frozenset(
    {"Mul", "Div", "Add", "Sub", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "Cast"}
)
_MAX_NORM_DEPTH = 10


@dataclass
class Norm:
    """A normalization: its kind, the tensor it normalizes, its output and affine parameters."""

    kind: str
    fused: bool
    input: ir.Value
    output: ir.Value
    weight: ir.Value | None
    bias: ir.Value | None
    nodes: tuple[ir.Node, ...]

    @property
    def epsilon(self) -> float | None:
        """The variance epsilon: a fused op's attribute, or the scalar added to the mean."""
        if self.fused:
            # ONNX's LayerNormalization and RMSNormalization default to 1e-5.
            return self.nodes[0].attributes.get_float("epsilon", 1e-5)
        for node in self.nodes:
            if node.op_type == "Add":
                for value in node.inputs:
                    data = constant_array(value)
                    other = [v for v in node.inputs if v is not value]
                    if (
                        data is not None
                        and data.size == 1
                        and other
                        and other[0].producer() is not None
                        and other[0].producer().op_type == "ReduceMean"
                    ):
                        return float(data.reshape(-1)[0])
        return None

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "fused": self.fused,
            "input": self.input.name,
            "output": self.output.name,
            "weight": None if self.weight is None else self.weight.name,
            "bias": None if self.bias is None else self.bias.name,
            "nodes": [node.name for node in self.nodes],
        }


@dataclass
class Residual:
    """The Add that puts a sublayer's output back onto the residual stream."""

    node: ir.Node
    operand: ir.Value
    output: ir.Value

    @property
    def addend(self) -> ir.Value:
        """The other input: what the Add puts onto ``operand``."""
        first, second = self.node.inputs[0], self.node.inputs[1]
        return second if first is self.operand else first

    def to_json(self) -> dict:
        return {"node": self.node.name, "operand": self.operand.name, "output": self.output.name}


def same_tensor(a: ir.Value, b: ir.Value) -> bool:
    """Whether ``a`` and ``b`` hold the same data up to views and dtype casts."""
    return skip_casts_and_views(a) is skip_casts_and_views(b)


def skip_casts_and_views(value: ir.Value) -> ir.Value:
    while True:
        seen = skip_views_up(_skip_casts_up(value))
        if seen is value:
            return value
        value = seen


def _skip_casts_up(value: ir.Value) -> ir.Value:
    node = value.producer()
    while node is not None and node.op_type == "Cast" and node.inputs[0] is not None:
        value = node.inputs[0]
        node = value.producer()
    return value


def _affine_parameter(node: ir.Node, width: int) -> ir.Value | None:
    for value in node.inputs:
        data = constant_array(value)
        if data is not None and data.size == width and data.size > 1:
            return value
    return None


def _decomposed_norm(output: ir.Value, width: int, order: dict[ir.Node, int]) -> Norm | None:
    region: list[ir.Node] = []
    frontier = [(output.producer(), 0)]
    while frontier:
        node, depth = frontier.pop()
        if node is None or node in region or node.op_type not in _NORM_ARITHMETIC:
            continue
        if depth > _MAX_NORM_DEPTH:
            return None
        region.append(node)
        if node.op_type == "ReduceMean" or _is_residual_add(node):
            continue
        for value in node.inputs:
            if value is not None and not is_constant(value):
                frontier.append((value.producer(), depth + 1))
    means = [node for node in region if node.op_type == "ReduceMean"]
    if not means:
        return None
    candidates = []
    for mean in means:
        source = mean.inputs[0]
        producer = source.producer()
        if producer is not None and producer.op_type == "Pow":
            if producer not in region:
                region.append(producer)
            source = producer.inputs[0]
        source = _skip_casts_up(source)
        node = source.producer()
        candidates.append((order.get(node, -1) if node is not None else -1, source))
    norm_input = min(candidates, key=lambda item: item[0])[1]
    region = [node for node in region if _depends_on(node, norm_input, region)]
    kind = "layer" if any(node.op_type == "Sub" for node in region) else "rms"
    last = output.producer()
    weight = bias = None
    if last is not None and last.op_type == "Add" and kind == "layer":
        bias = _affine_parameter(last, width)
        previous = [v.producer() for v in last.inputs if v is not None and v.producer() in region]
        last = previous[0] if previous else None
    if last is not None and last.op_type == "Mul":
        weight = _affine_parameter(last, width)
    return Norm(kind, False, norm_input, output, weight, bias, tuple(region))


def _is_residual_add(node: ir.Node) -> bool:
    """Norm arithmetic adds constants (epsilon, beta); an Add of two tensors is the stream."""
    return node.op_type == "Add" and not any(is_constant(v) for v in node.inputs)


def _depends_on(node: ir.Node, source: ir.Value, region: list[ir.Node]) -> bool:
    """Whether ``node`` reads ``source`` directly or through other ``region`` nodes."""
    stack, seen = [node], set()
    while stack:
        current = stack.pop()
        if current in seen:
            continue
        seen.add(current)
        for value in current.inputs:
            if value is None:
                continue
            if _skip_casts_up(value) is source:
                return True
            producer = value.producer()
            if producer is not None and producer in region:
                stack.append(producer)
    return False


def find_norm(value: ir.Value, width: int, order: dict[ir.Node, int]) -> Norm | None:
    """The normalization whose output is ``value`` (seen through views), if any.

    ``order`` maps nodes to their graph position; the earliest ReduceMean source is the
    normalized tensor (LayerNorm's second mean reads ``x - mean``, not ``x``).
    """
    value = skip_views_up(value)
    node = value.producer()
    if node is None:
        return None
    if node.op_type in FUSED_NORM_OPS or node.op_type in SKIP_NORM_OPS:
        kind = FUSED_NORM_OPS.get(node.op_type) or SKIP_NORM_OPS[node.op_type]
        is_skip = node.op_type in SKIP_NORM_OPS
        weight = (
            node.inputs[2 if is_skip else 1] if len(node.inputs) > (2 if is_skip else 1) else None
        )
        bias_index = 3 if is_skip else 2
        bias = node.inputs[bias_index] if len(node.inputs) > bias_index else None
        stream = node.outputs[3] if is_skip and len(node.outputs) > 3 else node.inputs[0]
        return Norm(kind, True, stream, value, weight, bias, (node,))
    return _decomposed_norm(value, width, order)
