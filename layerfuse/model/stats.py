"""Size facts of a model: what is on disk, what is a parameter, what is really unique.

``initializer_bytes`` counts each initializer once however many nodes read it, so a tied
model is credited for its sharing; ``shared_weights`` counts weights (4 KiB or more) read by
several nodes. ``unique_content_bytes`` also folds initializers whose *contents* are equal but
which are stored twice: the gap between the two is what a deduplication pass would still
save. :func:`shared_matmul_weights` is the one definition of "a tied weight" that the
runtime's pre-packing policy and the reports share.
"""

from __future__ import annotations

__all__ = ["ModelStats", "model_stats", "shared_matmul_weights"]

import hashlib
import os
from collections import Counter
from dataclasses import asdict, dataclass

import onnx_ir as ir

from layerfuse.model.graph import weight_source
from layerfuse.model.io import file_bytes, load_model

_SHARED_MIN_BYTES = 4096


@dataclass
class ModelStats:
    file_bytes: int
    parameters: int
    initializer_bytes: int
    unique_content_bytes: int
    shared_weights: int

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


def model_stats(model_path: str | os.PathLike) -> ModelStats:
    model = load_model(model_path)
    parameters = initializer_bytes = unique_bytes = shared = 0
    seen: set[tuple] = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        parameters += tensor.size
        initializer_bytes += tensor.nbytes
        readers = {id(use.node) for use in value.uses()}
        shared += len(readers) > 1 and tensor.nbytes >= _SHARED_MIN_BYTES
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(tensor.tobytes()).digest())
        if key not in seen:
            seen.add(key)
            unique_bytes += tensor.nbytes
    return ModelStats(
        file_bytes(model_path), int(parameters), initializer_bytes, unique_bytes, shared
    )
