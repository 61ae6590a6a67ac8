"""The wide FFN as ONE node: ONNX functions in the ``layerfuse`` domain.

A fused run of k FFNs is a single call ``layerfuse.FusedSwiGLU(x, W_gate_up, W_down)``:
one MatMul against the gate and up weights of all k FFNs concatenated along the hidden
dimension, a Split into gate and up halves, the SwiGLU, and one MatMul against the stacked
down weights. The function body uses only standard opset-18 ops, so any ONNX runtime can
execute it (onnxruntime inlines it at load), and tools that do not know the domain still see
one well-defined node. Ungated FFNs (GELU, GELU-tanh, ReLU) get ``FusedFFN`` variants with
biases.
"""

from __future__ import annotations

__all__ = ["DOMAIN", "function_name", "fused_function"]

import math

import onnx_ir as ir

DOMAIN = "layerfuse"
_OPSET = 18
_NAMES = {
    "swiglu": "FusedSwiGLU",
    "geglu": "FusedGeGLU",
    "reglu": "FusedReGLU",
    "gelu": "FusedGeluFFN",
    "gelu_tanh": "FusedGeluTanhFFN",
    "relu": "FusedReluFFN",
    "silu": "FusedSiluFFN",
}
GATED = frozenset({"swiglu", "geglu", "reglu"})


def function_name(kind: str) -> str:
    if kind not in _NAMES:
        raise ValueError(f"no fused function for FF kind '{kind}'")
    return _NAMES[kind]


def _scalar(value: float) -> ir.Value:
    return ir.val(None, const_value=ir.tensor(value, dtype=ir.DataType.FLOAT))


class _Builder:
    def __init__(self) -> None:
        self.nodes: list[ir.Node] = []

    def __call__(self, op: str, *inputs: ir.Value, **attributes) -> ir.Value:
        node = ir.node(op, list(inputs), attributes or None)
        self.nodes.append(node)
        return node.outputs[0]

    def constant(self, value: float) -> ir.Value:
        node = ir.node("Constant", [], {"value": ir.tensor(value, dtype=ir.DataType.FLOAT)})
        self.nodes.append(node)
        return node.outputs[0]

    def split(self, value: ir.Value) -> tuple[ir.Value, ir.Value]:
        node = ir.node("Split", [value], {"axis": -1, "num_outputs": 2}, num_outputs=2)
        self.nodes.append(node)
        return node.outputs[0], node.outputs[1]


def _activation(build: _Builder, kind: str, x: ir.Value) -> ir.Value:
    if kind in ("silu", "swiglu"):
        return build("Mul", x, build("Sigmoid", x))
    if kind in ("relu", "reglu"):
        return build("Relu", x)
    if kind in ("gelu", "geglu"):
        erf = build("Erf", build("Div", x, build.constant(math.sqrt(2.0))))
        return build(
            "Mul", build("Mul", x, build.constant(0.5)), build("Add", erf, build.constant(1.0))
        )
    if kind == "gelu_tanh":
        cube = build("Mul", build("Mul", x, x), x)
        inner = build("Add", x, build("Mul", cube, build.constant(0.044715)))
        tanh = build("Tanh", build("Mul", inner, build.constant(math.sqrt(2.0 / math.pi))))
        return build(
            "Mul", build("Mul", x, build.constant(0.5)), build("Add", tanh, build.constant(1.0))
        )
    raise ValueError(f"no activation '{kind}'")


def fused_function(kind: str) -> ir.Function:
    """The function for FF ``kind``: inputs (x, W_in, W_down[, b_in, b_down])."""
    build = _Builder()
    x = ir.Value(name="x")
    w_in = ir.Value(name="w_in")
    w_down = ir.Value(name="w_down")
    inputs = [x, w_in, w_down]
    projected = build("MatMul", x, w_in)
    if kind in GATED:
        gate, up = build.split(projected)
        hidden = build("Mul", _activation(build, kind, gate), up)
        output = build("MatMul", hidden, w_down)
    else:
        b_in, b_down = ir.Value(name="b_in"), ir.Value(name="b_down")
        inputs += [b_in, b_down]
        hidden = _activation(build, kind, build("Add", projected, b_in))
        output = build("Add", build("MatMul", hidden, w_down), b_down)
    output.name = "y"
    for index, node in enumerate(build.nodes):
        node.name = f"n{index}"
        for position, value in enumerate(node.outputs):
            if value is not output:
                value.name = f"t{index}_{position}"
    graph = ir.Graph(
        inputs, [output], nodes=build.nodes, opset_imports={"": _OPSET}, name=function_name(kind)
    )
    return ir.Function(DOMAIN, function_name(kind), graph=graph, attributes=[])
