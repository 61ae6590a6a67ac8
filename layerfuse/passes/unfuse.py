"""Split onnxruntime's fused residual norms back into a residual Add and a norm.

onnxruntime's transformer optimizer and onnxruntime-genai's model builder fuse each residual
Add into the norm that follows it: ``SkipLayerNormalization(x, skip, gamma, beta, bias)`` and
``SkipSimplifiedLayerNormalization(x, skip, gamma, bias)`` output the norm of
``x + skip (+ bias)`` and, as output 3, that sum itself (the residual stream). Pruning a
sublayer or fusing FFN runs rewires the residual stream, which a fused node hides; after this
pass the stream is a plain ``Add`` again, followed by ``LayerNormalization`` or onnxruntime's
``SimplifiedLayerNormalization`` with the same epsilon, and every reader of the fused node's
outputs reads the same tensor (same name) from the split form.

Only the mean and inverse-std outputs (1, 2) have no equivalent; a node whose graph reads them
is refused. onnxruntime refuses them itself in inference graphs, so this is not seen in practice.
"""

from __future__ import annotations

__all__ = ["SPLIT_NORMS", "unfuse_residual_norms"]

import onnx_ir as ir

from layerfuse.errors import PlanError

# fused op -> (plain norm op, index of the optional bias input)
SPLIT_NORMS = {
    "SkipLayerNormalization": ("LayerNormalization", 4),
    "SkipSimplifiedLayerNormalization": ("SimplifiedLayerNormalization", 3),
}
# onnxruntime's default when the attribute is absent (kDefaultSkipLayerNormEpsilon).
_DEFAULT_EPSILON = 1e-12
# The builder writes them in com.microsoft, the transformer optimizer in the default domain.
_DOMAINS = ("", "ai.onnx", "com.microsoft")


def _optional(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def _take_over(old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` stand where ``old`` stood: same readers, same name, same graph output."""
    name = old.name
    old.name = f"{name}.fused"
    new.name, new.type, new.shape = name, old.type, old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)


def _split(graph: ir.Graph, node: ir.Node) -> None:
    norm_op, bias_index = SPLIT_NORMS[node.op_type]
    for index in (1, 2):
        if len(node.outputs) > index and node.outputs[index].uses():
            raise PlanError(
                f"{node.op_type} '{node.name}': its mean/inverse-std output is read, so it "
                f"cannot be split into Add + {norm_op}"
            )
    tape = ir.tape.Tape()
    total = tape.op("Add", [node.inputs[0], node.inputs[1]], name=f"{node.name}.residual")
    bias = _optional(node, bias_index)
    if bias is not None:
        total = tape.op("Add", [total, bias], name=f"{node.name}.bias")
    epsilon = node.attributes.get_float("epsilon", _DEFAULT_EPSILON)
    attributes = {"axis": -1, "epsilon": epsilon}
    if norm_op == "LayerNormalization":
        inputs = [total, node.inputs[2]]
        beta = _optional(node, 3)
        if beta is not None:
            inputs.append(beta)
    else:
        inputs = [total, node.inputs[2]]
        attributes["stash_type"] = 1
    normalized = tape.op(norm_op, inputs, attributes, name=f"{node.name}.norm")
    graph.insert_before(node, tape.nodes)
    _take_over(node.outputs[0], normalized)
    if len(node.outputs) > 3 and node.outputs[3].name:
        _take_over(node.outputs[3], total)
    graph.remove(node, safe=True)


def unfuse_residual_norms(model: ir.Model) -> int:
    """Split every fused residual norm of the main graph; return how many were split."""
    fused = [n for n in model.graph if n.op_type in SPLIT_NORMS and n.domain in _DOMAINS]
    for node in fused:
        _split(model.graph, node)
    return len(fused)
