"""What users do to a model after layerfuse: quantize it, convert it to fp16, run the
onnxruntime transformers optimizer. Each step runs onnxruntime's own tool and then proves
that every tied set of the source is still one initializer (:mod:`.ties`)."""

from layerfuse.toolchain.convert import ConversionError, ConversionResult
from layerfuse.toolchain.fp16 import convert_fp16
from layerfuse.toolchain.optimizer import optimize
from layerfuse.toolchain.quantize import SCHEMES, quantize_model

__all__ = [
    "SCHEMES",
    "ConversionError",
    "ConversionResult",
    "convert_fp16",
    "optimize",
    "quantize_model",
]
