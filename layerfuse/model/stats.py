"""Size facts of a model file: what is on disk, what is a parameter, what is really unique.

``initializer_bytes`` counts each initializer once however many nodes read it, so a tied
model is credited for its sharing; ``shared_weights`` counts weights (4 KiB or more) read by
several nodes. ``unique_content_bytes`` also folds initializers whose
*contents* are equal but which are stored twice: the gap between the two is what a
deduplication pass would still save.
"""

from __future__ import annotations

__all__ = ["ModelStats", "model_stats"]

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from layerfuse.model.io import external_data_path, load_model


@dataclass
class ModelStats:
    file_bytes: int
    parameters: int
    initializer_bytes: int
    unique_content_bytes: int
    shared_weights: int

    def to_json(self) -> dict:
        return asdict(self)


def model_stats(model_path: str | os.PathLike) -> ModelStats:
    path = Path(model_path)
    model = load_model(path)
    data = external_data_path(path)
    file_bytes = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
    parameters = initializer_bytes = unique_bytes = shared = 0
    seen: set[tuple] = set()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        parameters += tensor.size
        initializer_bytes += tensor.nbytes
        readers = {id(use.node) for use in value.uses()}
        shared += len(readers) > 1 and tensor.nbytes >= 4096
        key = (tensor.dtype, tuple(tensor.shape), hashlib.sha256(tensor.tobytes()).digest())
        if key not in seen:
            seen.add(key)
            unique_bytes += tensor.nbytes
    return ModelStats(file_bytes, int(parameters), initializer_bytes, unique_bytes, shared)
