"""Inputs of a chosen shape for timing, built from what a graph declares.

``--inputs 1x32,8x512`` means batch x sequence length. Token ids are drawn below the model's
vocabulary size (from its manifest), masks are all ones, images are seeded noise; any other
float input gets its symbolic batch/sequence dimensions from the shape and fixed ones from the
graph. All graphs compared in one run must declare the same inputs.

Decoder graphs with a KV cache get an empty cache (``[batch, kv_heads, 0, head_dim]``): a
shape ``1x128`` times a prefill of 128 tokens, which is what the graph without a cache would
compute. :func:`empty_cache_feeds` gives any session the empty cache it declares, so
calibration, perplexity and evaluation run unchanged on cache graphs.
"""

from __future__ import annotations

__all__ = [
    "InputShape",
    "cache_input_shapes",
    "cache_inputs",
    "empty_cache_feeds",
    "graph_inputs",
    "parse_shapes",
    "synthetic_feeds",
]

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from layerfuse.errors import DataError, LayerfuseError
from layerfuse.model.cache import cache_entries
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


# (kv heads, head size, numpy dtype) of each cache input, by session: computed once.
_CACHE_SHAPES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NUMPY_FLOATS = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def _shapes_from_graph(graph: ir.Graph) -> dict[str, tuple[int, int, type]]:
    shapes = {}
    for entry in cache_entries(graph):
        if entry.heads is None or entry.head_dim is None:
            raise DataError(f"cannot tell the shape of KV-cache input '{entry.past.name}'")
        shapes[entry.past.name] = (entry.heads, entry.head_dim, entry.dtype.numpy().type)
    return shapes


def _session_graph(session) -> ir.Graph | None:
    """The graph a session was built from, without weights.

    onnxruntime exposes no graph, only declared input shapes; builder graphs declare the head
    size symbolically, so the source the session keeps (its path or serialized bytes) is read.
    """
    path = getattr(session, "_model_path", None)
    data = getattr(session, "_model_bytes", None)
    if path:
        proto = onnx.load(path, load_external_data=False)
    elif data:
        proto = onnx.load_from_string(data)
    else:
        return None
    return ir.serde.deserialize_model(proto).graph


def cache_input_shapes(session) -> dict[str, tuple[int, int, type]]:
    """KV-cache input name -> (kv heads, head size, numpy dtype) for an onnxruntime session.

    Declared shapes answer when they are concrete (torch exports); otherwise the graph is
    read once per session (see :func:`_session_graph`).
    """
    candidates = [
        i
        for i in session.get_inputs()
        if i.type in _NUMPY_FLOATS and len(i.shape) == 4 and not isinstance(i.shape[2], int)
    ]
    if not candidates:
        return {}
    if session in _CACHE_SHAPES:
        return _CACHE_SHAPES[session]
    graph = None
    if not all(isinstance(i.shape[1], int) and isinstance(i.shape[3], int) for i in candidates):
        graph = _session_graph(session)
    if graph is not None:
        shapes = _shapes_from_graph(graph)
    else:
        shapes = {i.name: (i.shape[1], i.shape[3], _NUMPY_FLOATS[i.type]) for i in candidates}
    _CACHE_SHAPES[session] = shapes
    return shapes


def empty_cache_feeds(session, batch: int, provided=()) -> dict[str, np.ndarray]:
    """Zero-length past keys/values ``[batch, kv_heads, 0, head_dim]`` for every cache input
    of ``session`` not in ``provided``: a prefill from an empty cache."""
    return {
        name: np.zeros((batch, heads, 0, head_dim), dtype)
        for name, (heads, head_dim, dtype) in cache_input_shapes(session).items()
        if name not in provided
    }


def cache_inputs(model_path: str | os.PathLike) -> dict[str, tuple[int, int, type]]:
    """KV-cache input name -> (kv heads, head size, numpy dtype) of the graph at a path."""
    proto = onnx.load(model_path, load_external_data=False)
    return _shapes_from_graph(ir.serde.deserialize_model(proto).graph)


def synthetic_feeds(model_path: str | os.PathLike, shape: InputShape, seed: int = 0) -> dict:
    manifest = read_manifest(model_path)
    vocab = int(manifest.config.get("vocab_size", 1000)) if manifest else 1000
    image = manifest.image_size if manifest and manifest.image_size else 224
    rng = np.random.default_rng(seed)
    caches = cache_inputs(model_path)
    feeds = {}
    for name, elem_type, dims in graph_inputs(model_path):
        if name in caches:
            heads, head_dim, dtype = caches[name]
            feeds[name] = np.zeros((shape.batch, heads, 0, head_dim), dtype)
            continue
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
