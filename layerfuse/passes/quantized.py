"""Refuse graphs whose linear layers are already quantized, saying why.

onnxruntime-genai's ``-p int4`` builds (and onnxruntime's weight quantizers) store each linear
layer as a 4/8-bit ``MatMulNBits`` (or integer MatMul) with per-block scales. Merging, pruning
and fusing change weights (average them, fold norm gains into them, concatenate them), so the
result would need new scales: dequantize, rewrite, quantize again, a second lossy rounding
that the graph's own quantization recipe (block size, symmetry, accuracy level) would have to
be re-run for. layerfuse does not do that silently; it stops and says how to get the same
result without double quantization: optimize the float graph, then quantize it once.
"""

from __future__ import annotations

__all__ = ["QUANTIZED_LINEAR_OPS", "refuse_quantized_linears"]

from collections import Counter

import onnx_ir as ir

from layerfuse.errors import DetectionError

QUANTIZED_LINEAR_OPS = frozenset(
    {"MatMulNBits", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "QGemm"}
)


def refuse_quantized_linears(model: ir.Model) -> None:
    """Raise one clear :class:`DetectionError` if the graph's linear layers are quantized.

    Every rewriting pass checks this in ``requires`` and detection checks it before saying a
    graph has no FF sublayer, so API callers and the CLI get the same reason.
    """
    found = Counter(
        node.op_type
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
        if node.op_type in QUANTIZED_LINEAR_OPS
    )
    if not found:
        return
    kinds = ", ".join(f"{count} {op}" for op, count in found.most_common())
    raise DetectionError(
        f"the graph's linear layers are quantized ({kinds}, e.g. an int4 "
        f"onnxruntime-genai build); merging, pruning and fusing change weights, so they "
        f"would have to be dequantized and quantized a second time; optimize the float graph "
        f"(builder -p fp32) and quantize the result once"
    )
