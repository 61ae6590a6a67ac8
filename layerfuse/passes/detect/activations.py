"""Which ops are activations, and what kind of FF an activation makes.

The kind is named by ops, never by names: GELU written with Erf, with Tanh, or as a fused
Gelu/FastGelu op; SiLU as Sigmoid and Mul, as Swish, or as onnxruntime's ``QuickGelu`` with
``alpha`` 1.0 (its level-2 optimizer writes SiLU that way; 1.702 is the quick GELU). With two
up-projections the one whose output reaches the activation is the gate.
"""

from __future__ import annotations

__all__ = ["ACTIVATION_OPS", "ELEMENTWISE", "activation_of", "ff_kind"]

import onnx_ir as ir

from layerfuse.model.graph import VIEW_OPS, consumers
from layerfuse.passes.detect.result import Match
from layerfuse.passes.linears import Linear

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
ELEMENTWISE = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Neg", "Cast", "Softplus", "Clip"}
    | set(ACTIVATION_OPS)
    | VIEW_OPS
)
_GATED_KIND = {"silu": "swiglu", "gelu": "geglu", "gelu_tanh": "geglu", "relu": "reglu"}
# QuickGelu(x) = x * sigmoid(alpha * x): alpha 1 is SiLU (onnxruntime writes SiLU that way).
_QUICK_GELU_ALPHA = 1.702


def activation_of(node: ir.Node) -> str | None:
    """The activation an op implies (None for non-activation ops)."""
    if node.op_type == "QuickGelu":
        alpha = node.attributes.get_float("alpha", _QUICK_GELU_ALPHA)
        return "silu" if abs(alpha - 1.0) < 1e-6 else "gelu_quick"
    return ACTIVATION_OPS.get(node.op_type)


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


def ff_kind(ups: list[Linear], region: list[ir.Node]) -> Match[tuple]:
    """(kind, activation, gate, up) from the activation ops in the region."""
    activations = {a for node in region if (a := activation_of(node)) is not None}
    if len(activations) != 1:
        found = ", ".join(sorted(activations)) or "none"
        return Match.fail(
            f"needs one activation (GELU, ReLU, SiLU, ...) between the projections, found {found}",
            depth=4,
        )
    activation = activations.pop()
    if len(ups) == 1:
        return Match.ok((activation, activation, None, ups[0]))
    gating = [_reaches_activation(up.output, set(region)) for up in ups]
    if sum(gating) != 1:
        return Match.fail(
            f"{sum(gating)} of its two up-projections reach the activation; a "
            "gated FF has exactly one (the gate)",
            depth=4,
        )
    if activation not in _GATED_KIND:
        return Match.fail(f"gated FFs with activation {activation} are not supported", depth=4)
    gate, up = (ups[0], ups[1]) if gating[0] else (ups[1], ups[0])
    return Match.ok((_GATED_KIND[activation], activation, gate, up))
