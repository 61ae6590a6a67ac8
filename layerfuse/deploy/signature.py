"""What a served model takes and returns, read from the graph (never from names).

Inference servers speak the KServe v2 protocol (Triton and KServe alike): every tensor has a
name, a v2 datatype (``INT64``, ``FP32``, ...) and a shape in which ``-1`` marks a dimension
the graph leaves open. Triton's ``config.pbtxt`` spells the same datatypes ``TYPE_INT64``,
``TYPE_FP32``, ... Both spellings come from one table keyed by the ONNX element type, so the
repository writer, its validator and the KServe model agree by construction.
"""

from __future__ import annotations

__all__ = [
    "Signature",
    "TensorSpec",
    "external_data_files",
    "graph_signature",
    "triton_type",
]

from dataclasses import dataclass
from pathlib import Path

import onnx_ir as ir

from layerfuse.errors import InvalidModelError

# ONNX element type -> KServe v2 datatype. Triton's config type is "TYPE_" + this name,
# except BYTES, which Triton's config calls TYPE_STRING.
_V2_TYPES = {
    ir.DataType.BOOL: "BOOL",
    ir.DataType.UINT8: "UINT8",
    ir.DataType.UINT16: "UINT16",
    ir.DataType.UINT32: "UINT32",
    ir.DataType.UINT64: "UINT64",
    ir.DataType.INT8: "INT8",
    ir.DataType.INT16: "INT16",
    ir.DataType.INT32: "INT32",
    ir.DataType.INT64: "INT64",
    ir.DataType.FLOAT16: "FP16",
    ir.DataType.FLOAT: "FP32",
    ir.DataType.DOUBLE: "FP64",
    ir.DataType.BFLOAT16: "BF16",
    ir.DataType.STRING: "BYTES",
}


def triton_type(datatype: str) -> str:
    """The ``config.pbtxt`` spelling of a v2 datatype (``FP32`` -> ``TYPE_FP32``)."""
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_json(self) -> dict:
        """The v2 protocol's metadata entry (what ``GET /v2/models/NAME`` lists)."""
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def batchable(self) -> bool:
        """Every tensor's first dimension is open (and more follow, as Triton wants at least
        one dimension besides the batch), so a server may stack requests along it."""
        return all(
            len(spec.shape) >= 2 and spec.shape[0] == -1 for spec in (*self.inputs, *self.outputs)
        )


def _spec(value: ir.Value, where: str) -> TensorSpec:
    if value.dtype not in _V2_TYPES:
        raise InvalidModelError(
            f"{where} '{value.name}' has element type {value.dtype}, which the KServe v2 "
            f"protocol cannot carry"
        )
    if value.shape is None:
        raise InvalidModelError(
            f"{where} '{value.name}' has no known rank; servers need one (re-export the "
            f"model with shapes on its inputs and outputs)"
        )
    dims = tuple(dim if isinstance(dim, int) else -1 for dim in value.shape.dims)
    return TensorSpec(value.name, _V2_TYPES[value.dtype], dims)


def graph_signature(model: ir.Model) -> Signature:
    """Inputs (graph inputs that are not initializers) and outputs of the main graph."""
    initializers = set(model.graph.initializers)
    return Signature(
        inputs=tuple(
            _spec(value, "input") for value in model.graph.inputs if value.name not in initializers
        ),
        outputs=tuple(_spec(value, "output") for value in model.graph.outputs),
    )


def external_data_files(model: ir.Model) -> list[Path]:
    """Relative paths of the external data files the main graph's weights live in.

    A server opens the model by path and finds these under the location recorded in the
    graph, relative to the model file, so a deployment must keep each one under that name.
    """
    locations = {
        value.const_value.location
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    return sorted(Path(location) for location in locations)
