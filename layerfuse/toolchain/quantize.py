"""int8 and int4 weight quantization through onnxruntime's own quantizers, ties kept.

- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` (MatMul weights to int8 per tensor,
  activations quantized at run time; onnxruntime fuses the result into
  ``DynamicQuantizeMatMul``/``MatMulIntegerToFloat``). It quantizes per *initializer*, so a
  weight read by k MatMuls becomes one int8 initializer read k times.
- ``int4``: ``MatMulNBits`` nodes (block-wise, symmetric), streamed one weight at a time by
  :mod:`.int4`: the same bytes as onnxruntime's ``MatMulNBitsQuantizer``, which loads the
  whole model and peaked at 5-7x its size. Each weight is quantized once, however many
  MatMuls read it.

Only MatMuls whose weight is an initializer are quantized (``MatMulConstBOnly``):
attention's activation-by-activation MatMuls, embeddings (Gather) and an output projection
that reads the embedding table through a Transpose (tied word embeddings, as in SmolLM2)
would stay float32; tied word embeddings are then quantized once for both of their readers
(:mod:`.embeddings`), in the original and the variant alike. layerfuse's fused FFNs are
inlined first so that their weights are quantized too (int4: onnx_ir's ``InlinePass`` on the
lazy model, so no weight is read for it).
"""

from __future__ import annotations

__all__ = ["SCHEMES", "quantize_model"]

import os
from pathlib import Path

import onnx_ir as ir
from onnx_ir.passes.common import InlinePass

from layerfuse.model.io import load_model
from layerfuse.toolchain.convert import (
    ConversionError,
    ConversionResult,
    load_inlined,
    run_conversion,
)
from layerfuse.toolchain.embeddings import share_tied_embeddings
from layerfuse.toolchain.int4 import TensorSink, quantize_matmuls
from layerfuse.toolchain.ties import deduplicate_initializers

SCHEMES = ("int8", "int4")


def _int8(details: dict):
    def transform(source: Path, scratch: Path) -> ir.Model:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        target = scratch / "model.onnx"
        quantize_dynamic(
            load_inlined(source),
            target,
            op_types_to_quantize=["MatMul"],
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
            extra_options={"MatMulConstBOnly": True},
        )
        # Returned as an onnx_ir model (the embeddings rewrite works on one), which the driver
        # takes as it is: the equal-content folding it gives a proto happens here.
        model = deduplicate_initializers(ir.load(target))
        if details["embeddings"]:
            details["embeddings"] = share_tied_embeddings(model, "int8")
        return model

    return transform


def _int4(details: dict, block_size: int, accuracy_level: int | None):
    def transform(source: Path, scratch: Path) -> ir.Model:
        model = load_model(source)
        InlinePass()(model)
        sink = TensorSink(scratch / "int4.data")
        details["matmuls"] = quantize_matmuls(model, block_size, accuracy_level, sink)
        if details["embeddings"]:
            details["embeddings"] = share_tied_embeddings(
                model, "int4", block_size, accuracy_level, sink
            )
        return model

    return transform


def quantize_model(
    source: str | os.PathLike,
    out: str | os.PathLike,
    scheme: str,
    *,
    block_size: int = 32,
    accuracy_level: int | None = None,
    embeddings: bool = True,
) -> ConversionResult:
    """Quantize ``source`` to ``scheme`` (``int8`` or ``int4``) into ``out``; see module doc.

    ``block_size`` (int4: elements per scale, a power of two >= 16) and ``accuracy_level``
    (int4: 4 lets the CPU kernel compute in int8, faster and slightly less exact) are
    ``MatMulNBits``' attributes, as ``MatMulNBitsQuantizer`` takes them. ``embeddings``:
    quantize tied word embeddings once for both readers (:mod:`.embeddings`);
    ``details["embeddings"]`` names the table or is None where the model has none
    (int4: ``details["matmuls"]`` counts the MatMuls replaced).
    """
    if scheme not in SCHEMES:
        raise ConversionError(f"unknown quantization '{scheme}' (choose {' or '.join(SCHEMES)})")
    if scheme == "int8":
        details = {"quantizer": "quantize_dynamic", "embeddings": embeddings}
        return run_conversion(source, out, "int8", _int8(details), details)
    if block_size < 16 or block_size & (block_size - 1):
        raise ConversionError(f"block size {block_size} must be a power of two of at least 16")
    details = {
        "quantizer": "streamed MatMulNBits (layerfuse.toolchain.int4)",
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "embeddings": embeddings,
    }
    transform = _int4(details, block_size, accuracy_level)
    return run_conversion(source, out, "int4", transform, details)
