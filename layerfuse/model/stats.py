"""Size facts of a model: what is on disk, what is a parameter, what is really unique.

``initializer_bytes`` counts each initializer once however many nodes read it, so a tied
model is credited for its sharing; ``shared_weights`` counts weights (4 KiB or more) read by
several nodes. ``unique_content_bytes`` also folds initializers whose *contents* are equal but
which are stored twice: the gap between the two is what a deduplication pass would still
save. :func:`shared_matmul_weights` is the one definition of "a tied weight" that the
runtime's pre-packing policy and the reports share.

``parameters`` counts *logical* weights, so a quantized variant reports the parameters of
the float model it came from: a ``MatMulNBits`` weight stores two 4-bit values per uint8
element (plus one scale per block), and counting its stored elements halved a 268M model to
130M. Quantization metadata (scales, zero points, group indices) is not a parameter of the
model but an overhead of its format; ``quantization_parameters`` reports it separately, and
its bytes are in ``initializer_bytes`` like any other.
"""

from __future__ import annotations

__all__ = [
    "ModelStats",
    "ParameterCount",
    "count_parameters",
    "model_stats",
    "shared_matmul_weights",
]

import hashlib
import os
from collections import Counter
from dataclasses import asdict, dataclass

import onnx_ir as ir

from layerfuse.model.graph import weight_source
from layerfuse.model.io import file_bytes, load_model

_SHARED_MIN_BYTES = 4096
_DIGEST_CHUNK = 1 << 24
# Inputs that hold scales, zero points or group indices of a quantized weight, by op type.
_METADATA_INPUTS = {
    "MatMulNBits": (2, 3, 4),
    "GatherBlockQuantized": (2, 3),
    "DynamicQuantizeMatMul": (2, 3),
    "MatMulInteger": (2, 3),
    "MatMulIntegerToFloat": (2, 3, 4, 5),
    "DequantizeLinear": (1, 2),
    "QuantizeLinear": (1, 2),
}
# Packed low-bit types whose shape is already logical (onnx_ir sizes them per element).
_LOGICAL_DTYPES = {ir.DataType.INT4, ir.DataType.UINT4}


@dataclass
class ModelStats:
    file_bytes: int
    parameters: int
    initializer_bytes: int
    unique_content_bytes: int
    shared_weights: int
    quantization_parameters: int = 0

    def to_json(self) -> dict:
        return asdict(self)


def shared_matmul_weights(model: ir.Model) -> dict[str, int]:
    """Initializers read as a weight by more than one MatMul/Gemm, with their reader counts.

    A weight reached through Transpose/Cast/Identity counts for the node at the end of that
    path: that is the weight onnxruntime pre-packs, per node.
    """
    readers: Counter[str] = Counter()
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
            source = weight_source(node.inputs[1])
            if source is not None:
                readers[source.initializer.name] += 1
    return {name: count for name, count in readers.items() if count > 1}


@dataclass
class ParameterCount:
    """Logical weight elements, and scales/zero points of quantized weights apart."""

    weights: int = 0
    quantization: int = 0


def _is_dynamic_scale(value: ir.Value | None) -> bool:
    """Whether ``value`` is the activation scale that ``DynamicQuantizeLinear`` computes:
    ``quantize_dynamic`` multiplies it with each weight's scale initializer."""
    producer = None if value is None else value.producer()
    return producer is not None and producer.op_type == "DynamicQuantizeLinear"


def _logical_elements(value: ir.Value, tensor: ir.TensorProtocol) -> int | None:
    """Elements of the weight ``tensor`` stands for, or None when it is quantization
    metadata: packed 4-bit blocks count as the N x K matrix they encode."""
    elements = int(tensor.size)
    for node, index in value.uses():
        op = node.op_type
        if index in _METADATA_INPUTS.get(op, ()):
            return None
        if op == "Mul" and _is_dynamic_scale(node.inputs[1 - index]):
            return None
        if op == "MatMulNBits" and index == 1:
            elements = node.attributes.get_int("N", 0) * node.attributes.get_int("K", 0)
        elif op == "GatherBlockQuantized" and index == 0 and tensor.dtype not in _LOGICAL_DTYPES:
            elements = int(tensor.size) * 8 // node.attributes.get_int("bits", 4)
    return elements


def count_parameters(model: ir.Model) -> ParameterCount:
    """Parameters of the main graph, each initializer once however often it is read.

    Use this rather than counting stored elements (``layerfuse.model.io.parameter_count``)
    wherever the graph may be quantized.
    """
    count = ParameterCount()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        elements = _logical_elements(value, tensor)
        if elements is None:
            count.quantization += int(tensor.size)
        else:
            count.weights += elements
    return count


def _content_digest(tensor: ir.TensorProtocol) -> bytes:
    """sha256 of a tensor's bytes; an external one is read from its file a chunk at a time
    (``tobytes`` would map the data file and keep every weight resident: bench on a 9 GB model
    held the model twice, once here and once in onnxruntime)."""
    if not isinstance(tensor, ir.ExternalTensor):
        return hashlib.sha256(tensor.tobytes()).digest()
    digest = hashlib.sha256()
    remaining = tensor.length or tensor.nbytes
    with open(tensor.path, "rb") as file:
        file.seek(tensor.offset or 0)
        while remaining > 0:
            chunk = file.read(min(remaining, _DIGEST_CHUNK))
            if not chunk:
                break
            digest.update(chunk)
            remaining -= len(chunk)
    return digest.digest()


def model_stats(model_path: str | os.PathLike) -> ModelStats:
    model = load_model(model_path)
    initializer_bytes = unique_bytes = shared = 0
    seen: set[tuple] = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        initializer_bytes += tensor.nbytes
        readers = {id(use.node) for use in value.uses()}
        shared += len(readers) > 1 and tensor.nbytes >= _SHARED_MIN_BYTES
        key = (tensor.dtype, tuple(tensor.shape), _content_digest(tensor))
        if key not in seen:
            seen.add(key)
            unique_bytes += tensor.nbytes
    parameters = count_parameters(model)
    return ModelStats(
        file_bytes(model_path),
        parameters.weights,
        initializer_bytes,
        unique_bytes,
        shared,
        parameters.quantization,
    )
