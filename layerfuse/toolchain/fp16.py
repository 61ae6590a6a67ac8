"""float16 conversion with ties kept (for CUDA; CPU onnxruntime runs most fp16 ops slowly).

``onnxruntime.transformers.float16.convert_float_to_float16`` converts every float
initializer once, in place, whatever number of nodes reads it, and ``keep_io_types`` keeps the
model's float32 inputs and outputs (Casts at the boundary only), so graphs of one family stay
interchangeable in ``bench``. The driver traces the ties afterwards: an op block list that
made the converter put a Cast in front of some readers of a tied weight would show up there.
The converter appends the Casts it inserts at the end of the graph; the driver sorts the
result (:func:`layerfuse.toolchain.convert.run_conversion`), which is what makes graphs with
float32 inputs (ViT's ``pixel_values``) valid ONNX after conversion.

A model without float32 weights is refused: the converter would run on it and add a second
set of boundary Casts whose names collide with the first.
"""

from __future__ import annotations

__all__ = ["convert_fp16"]

import os
from pathlib import Path

import onnx

from layerfuse.toolchain.convert import (
    ConversionError,
    ConversionResult,
    load_inlined,
    run_conversion,
)


def _fp16(source: Path, scratch: Path) -> onnx.ModelProto:
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = load_inlined(source)
    types = {init.data_type for init in model.graph.initializer}
    if onnx.TensorProto.FLOAT not in types:
        state = "is already float16" if onnx.TensorProto.FLOAT16 in types else "has none"
        raise ConversionError(
            f"{source} has no float32 weights to convert ({state}); nothing written"
        )
    return convert_float_to_float16(model, keep_io_types=True)


def convert_fp16(source: str | os.PathLike, out: str | os.PathLike) -> ConversionResult:
    return run_conversion(source, out, "fp16", _fp16, {"converter": "convert_float_to_float16"})
