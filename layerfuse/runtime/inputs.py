"""Inputs of a chosen shape for timing, built from what a graph declares.

``--inputs 1x32,8x512`` means batch x sequence length. Token ids are drawn below the model's
vocabulary size (from its manifest), masks are all ones, images are seeded noise; any other
float input gets its symbolic batch/sequence dimensions from the shape and fixed ones from the
graph. All graphs compared in one run must declare the same inputs.
"""

from __future__ import annotations

__all__ = ["InputShape", "graph_inputs", "parse_shapes", "synthetic_feeds"]

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from layerfuse.errors import LayerfuseError
from layerfuse.model.manifest import read_manifest

_INTEGER_TYPES = {onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32}
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class InputShape:
    batch: int
    sequence: int

    def __str__(self) -> str:
        return f"{self.batch}x{self.sequence}"


def parse_shapes(text: str) -> list[InputShape]:
    shapes = []
    for part in text.split(","):
        try:
            batch, sequence = (int(x) for x in part.strip().lower().split("x"))
        except ValueError:
            raise LayerfuseError(
                f"input shape '{part}' is not BATCHxSEQUENCE, e.g. 1x128"
            ) from None
        if batch < 1 or sequence < 1:
            raise LayerfuseError(f"input shape '{part}' must be positive")
        shapes.append(InputShape(batch, sequence))
    return shapes


def graph_inputs(model_path: str | os.PathLike) -> list[tuple[str, int, list]]:
    """(name, element type, dims) of each graph input that is not an initializer."""
    proto = onnx.load(model_path, load_external_data=False)
    initializers = {tensor.name for tensor in proto.graph.initializer}
    found = []
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in tensor.shape.dim]
        found.append((value.name, tensor.elem_type, dims))
    return found


def synthetic_feeds(model_path: str | os.PathLike, shape: InputShape, seed: int = 0) -> dict:
    manifest = read_manifest(model_path)
    vocab = int(manifest.config.get("vocab_size", 1000)) if manifest else 1000
    image = manifest.image_size if manifest and manifest.image_size else 224
    rng = np.random.default_rng(seed)
    feeds = {}
    for name, elem_type, dims in graph_inputs(model_path):
        if name == "pixel_values":
            feeds[name] = rng.standard_normal((shape.batch, 3, image, image)).astype(np.float32)
            continue
        concrete = []
        for position, dim in enumerate(dims):
            if isinstance(dim, int) and dim > 0:
                concrete.append(dim)
            else:
                concrete.append(shape.batch if position == 0 else shape.sequence)
        if elem_type in _INTEGER_TYPES:
            if "mask" in name:
                data = np.ones(concrete, _INTEGER_TYPES[elem_type])
            elif "position" in name:
                data = np.broadcast_to(np.arange(concrete[-1]), concrete).astype(np.int64)
            elif "type" in name:
                data = np.zeros(concrete, _INTEGER_TYPES[elem_type])
            else:
                data = rng.integers(0, vocab, size=concrete).astype(_INTEGER_TYPES[elem_type])
        elif elem_type in _FLOAT_TYPES:
            data = rng.standard_normal(concrete).astype(_FLOAT_TYPES[elem_type])
        else:
            raise LayerfuseError(f"{Path(model_path).name}: cannot synthesize input '{name}'")
        feeds[name] = data
    return feeds
