"""int8 and int4 weight quantization through onnxruntime's own quantizers, ties kept.

- ``int8``: ``onnxruntime.quantization.quantize_dynamic`` (MatMul weights to int8 per tensor,
  activations quantized at run time; onnxruntime fuses the result into
  ``DynamicQuantizeMatMul``/``MatMulIntegerToFloat``). It quantizes per *initializer*, so a
  weight read by k MatMuls becomes one int8 initializer read k times.
- ``int4``: ``MatMulNBitsQuantizer`` (block-wise, symmetric, ``MatMulNBits`` nodes). It
  quantizes per *node*: every reader of a tied weight appends its own ``<name>_Q4`` copy,
  and only its final clean-up (which keeps the first initializer of each name) happens to
  leave one. The driver's deduplication and tie trace make the result not depend on that.

Only MatMuls whose weight is an initializer are quantized (``MatMulConstBOnly``):
attention's activation-by-activation MatMuls, embeddings (Gather) and an output projection
that reads the embedding table through a Transpose (tied word embeddings, as in SmolLM2)
would stay float32; tied word embeddings are then quantized once for both of their readers
(:mod:`.embeddings`), in the original and the variant alike. layerfuse's fused FFNs are
inlined first so that their weights are quantized too.
"""

from __future__ import annotations

__all__ = ["SCHEMES", "quantize_model"]

import os
from pathlib import Path

import onnx

from layerfuse.toolchain.convert import (
    ConversionError,
    ConversionResult,
    load_inlined,
    run_conversion,
)
from layerfuse.toolchain.embeddings import share_tied_embeddings

SCHEMES = ("int8", "int4")


def _int8(details: dict):
    def transform(source: Path, scratch: Path) -> onnx.ModelProto:
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
        model = onnx.load(target)
        if details["embeddings"]:
            details["embeddings"] = share_tied_embeddings(model, "int8")
        return model

    return transform


def _int4(details: dict, block_size: int, accuracy_level: int | None):
    def transform(source: Path, scratch: Path) -> onnx.ModelProto:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(
            load_inlined(source),
            bits=4,
            block_size=block_size,
            is_symmetric=True,
            accuracy_level=accuracy_level,
            op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
        model = quantizer.model.model
        if details["embeddings"]:
            details["embeddings"] = share_tied_embeddings(model, "int4", block_size, accuracy_level)
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
    (int4: 4 lets the CPU kernel compute in int8, faster and slightly less exact) pass
    through to ``MatMulNBitsQuantizer``. ``embeddings``: quantize tied word embeddings once
    for both readers (:mod:`.embeddings`); ``details["embeddings"]`` names the table or is
    None where the model has none.
    """
    if scheme not in SCHEMES:
        raise ConversionError(f"unknown quantization '{scheme}' (choose {' or '.join(SCHEMES)})")
    if scheme == "int8":
        details = {"quantizer": "quantize_dynamic", "embeddings": embeddings}
        return run_conversion(source, out, "int8", _int8(details), details)
    if block_size < 16 or block_size & (block_size - 1):
        raise ConversionError(f"block size {block_size} must be a power of two of at least 16")
    details = {
        "quantizer": "MatMulNBitsQuantizer",
        "block_size": block_size,
        "accuracy_level": accuracy_level,
        "embeddings": embeddings,
    }
    transform = _int4(details, block_size, accuracy_level)
    return run_conversion(source, out, "int4", transform, details)
