"""The onnxruntime transformers optimizer on a tied or fused model, ties checked.

``optimize_model`` fuses norms, residual Adds, attention and GELU patterns by matching node
patterns; it does not look at which initializer a MatMul reads, so a tied model gets the same
fusions as its original (compare :attr:`ConversionResult.details` ``fused``), and layerfuse's
``Fused*`` function nodes pass through as opaque nodes. The model type picks the fusion set:
``gpt2`` suits decoder-only models exported by torch (Llama family included: it fuses the
RMSNorms into ``SkipSimplifiedLayerNormalization``), ``bert`` encoders.
"""

from __future__ import annotations

__all__ = ["optimize"]

import os
from pathlib import Path

import onnx

from layerfuse.model.manifest import read_manifest
from layerfuse.toolchain.convert import ConversionResult, run_conversion


def _model_type_and_shape(source: Path, model_type: str | None) -> tuple[str, int, int]:
    """Fusion set and (heads, hidden size) from the manifest; 0 lets the optimizer infer."""
    manifest = read_manifest(source)
    config = manifest.config if manifest else {}
    if model_type is None:
        model_type = "bert" if manifest is not None and manifest.task != "causal-lm" else "gpt2"
    return model_type, int(config.get("num_attention_heads", 0)), int(config.get("hidden_size", 0))


def optimize(
    source: str | os.PathLike,
    out: str | os.PathLike,
    *,
    model_type: str | None = None,
    opt_level: int = 0,
) -> ConversionResult:
    """Run the transformers optimizer (``opt_level`` 0: its own fusions only, onnxruntime's
    graph optimizations are left to the session that loads the result)."""
    source = Path(source)
    model_type, heads, hidden = _model_type_and_shape(source, model_type)
    fused: dict[str, int] = {}

    def transform(path: Path, scratch: Path) -> onnx.ModelProto:
        from onnxruntime.transformers.optimizer import optimize_model

        optimized = optimize_model(
            str(path),
            model_type=model_type,
            num_heads=heads,
            hidden_size=hidden,
            opt_level=opt_level,
        )
        fused.update({op: n for op, n in optimized.get_fused_operator_statistics().items() if n})
        return optimized.model

    details = {"model_type": model_type, "opt_level": opt_level, "fused": fused}
    return run_conversion(source, out, "optimized", transform, details)
