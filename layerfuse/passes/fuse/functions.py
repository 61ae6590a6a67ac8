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

__all__ = ["DOMAIN", "GATED", "function_name", "fused_function"]

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


def _constant(tape: ir.tape.Tape, value: float, like: ir.Value) -> ir.Value:
    """``value`` in ``like``'s dtype: one function body serves fp32, fp16 and bf16 graphs
    (onnxruntime folds the CastLike at load)."""
    constant = tape.op("Constant", [], {"value": ir.tensor(value, dtype=ir.DataType.FLOAT)})
    return tape.op("CastLike", [constant, like])


def _activation(tape: ir.tape.Tape, kind: str, x: ir.Value) -> ir.Value:
    if kind in ("silu", "swiglu"):
        return tape.op("Mul", [x, tape.op("Sigmoid", [x])])
    if kind in ("relu", "reglu"):
        return tape.op("Relu", [x])
    half_x = tape.op("Mul", [x, _constant(tape, 0.5, x)])
    if kind in ("gelu", "geglu"):
        erf = tape.op("Erf", [tape.op("Div", [x, _constant(tape, math.sqrt(2.0), x)])])
        return tape.op("Mul", [half_x, tape.op("Add", [erf, _constant(tape, 1.0, x)])])
    if kind == "gelu_tanh":
        cube = tape.op("Mul", [tape.op("Mul", [x, x]), x])
        inner = tape.op("Add", [x, tape.op("Mul", [cube, _constant(tape, 0.044715, x)])])
        scaled = tape.op("Mul", [inner, _constant(tape, math.sqrt(2.0 / math.pi), x)])
        return tape.op(
            "Mul", [half_x, tape.op("Add", [tape.op("Tanh", [scaled]), _constant(tape, 1.0, x)])]
        )
    raise ValueError(f"no activation '{kind}'")


def fused_function(kind: str) -> ir.Function:
    """The function for FF ``kind``: inputs (x, W_in, W_down[, b_in, b_down])."""
    tape = ir.tape.Tape()
    x, w_in, w_down = ir.Value(name="x"), ir.Value(name="w_in"), ir.Value(name="w_down")
    inputs = [x, w_in, w_down]
    projected = tape.op("MatMul", [x, w_in])
    if kind in GATED:
        gate, up = tape.op_multi_out(
            "Split", [projected], {"axis": -1, "num_outputs": 2}, num_outputs=2
        )
        hidden = tape.op("Mul", [_activation(tape, kind, gate), up])
        output = tape.op("MatMul", [hidden, w_down])
    else:
        b_in, b_down = ir.Value(name="b_in"), ir.Value(name="b_down")
        inputs += [b_in, b_down]
        hidden = _activation(tape, kind, tape.op("Add", [projected, b_in]))
        output = tape.op("Add", [tape.op("MatMul", [hidden, w_down]), b_down])
    output.name = "y"
    for index, node in enumerate(tape.nodes):
        node.name = f"n{index}"
        for position, value in enumerate(node.outputs):
            if value is not output:
                value.name = f"t{index}_{position}"
    graph = ir.Graph(
        inputs, [output], nodes=tape.nodes, opset_imports={"": _OPSET}, name=function_name(kind)
    )
    return ir.Function(DOMAIN, function_name(kind), graph=graph, attributes=[])
