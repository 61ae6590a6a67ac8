"""Move a model staged beside its destination into place as one atomic step.

A model with external data is two files, and two renames are never atomic together. So the
weights never take a name that anything already reads: each publication gives the data file a
name that is free in the destination folder (``model.onnx.data``, else ``model.onnx.1.data``,
...), points the staged graph at it, and only then renames the graph over the old one. Until
that last rename the old graph still reads its old, untouched weights; after it, the new graph
reads the new ones. Data files of the target's pattern that no graph in the folder reads any
more (the previous generation, or one a killed run left) are removed before and after, so a
folder never keeps more than the weights its graphs need.
"""

from __future__ import annotations

__all__ = ["external_locations", "model_files", "publish_model"]

import itertools
import os
import re
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError


def external_locations(model_path: str | os.PathLike) -> set[str]:
    """The external data files ``model_path`` reads, as written in the graph (no weights read)."""
    try:
        proto = onnx.load(Path(model_path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeWarning):
        return set()
    return {
        entry.value
        for tensor in _initializers(proto)
        if tensor.data_location == onnx.TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


def model_files(model_path: str | os.PathLike) -> list[Path]:
    """Every file a model consists of: the graph and each external data file it reads."""
    model_path = Path(model_path)
    return [model_path] + [
        model_path.parent / location for location in sorted(external_locations(model_path))
    ]


def _initializers(proto: onnx.ModelProto):
    yield from proto.graph.initializer
    for function in proto.functions:
        for node in function.node:
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    yield attribute.t


def _claim_free_name(source: Path, folder: Path, stem: str) -> Path:
    """Hard-link ``source`` under the first free ``stem[.N].data`` name (link fails if taken)."""
    for generation in itertools.count():
        name = f"{stem}.data" if generation == 0 else f"{stem}.{generation}.data"
        target = folder / name
        try:
            os.link(source, target)
        except FileExistsError:
            continue
        source.unlink()
        return target
    raise AssertionError("unreachable")


def _relocate(staged: Path, old: str, new: str) -> None:
    proto = onnx.load(staged, load_external_data=False)
    for tensor in _initializers(proto):
        for entry in tensor.external_data:
            if entry.key == "location" and entry.value == old:
                entry.value = new
    onnx.save(proto, staged)


def _remove_unread_generations(folder: Path, stem: str) -> None:
    pattern = re.compile(rf"^{re.escape(stem)}(\.\d+)?\.data$")
    candidates = [entry for entry in folder.iterdir() if pattern.match(entry.name)]
    if not candidates:
        return
    read = set()
    for graph in folder.glob("*.onnx"):
        read |= {(folder / location).resolve() for location in external_locations(graph)}
    for candidate in candidates:
        if candidate.resolve() not in read:
            candidate.unlink(missing_ok=True)


def publish_model(staged: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the staged graph (and its one external data file, if any) to ``target``."""
    staged, target = Path(staged), Path(target)
    folder = target.parent
    locations = external_locations(staged)
    if len(locations) > 1:
        raise ValueError(f"{staged}: expected at most one external data file, not {locations}")
    _remove_unread_generations(folder, target.name)
    for location in locations:
        placed = _claim_free_name(staged.parent / location, folder, target.name)
        if placed.name != location:
            _relocate(staged, location, placed.name)
    os.replace(staged, target)
    _remove_unread_generations(folder, target.name)
    return target
