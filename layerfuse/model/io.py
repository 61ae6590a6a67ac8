"""Load and save ONNX models without surprises.

Loading validates what onnx would only discover deep inside a run (a truncated file, external
data that is missing, short, or points outside the model folder) and turns it into one clear
:class:`InvalidModelError`. Weights stay lazy: onnx_ir memory-maps external tensors and reads
bytes only when a pass asks for them.

Saving never leaves a half-written model where a good one stood, and never writes over a file
that any graph reads: everything is written into a staging folder beside the destination and
published by :mod:`layerfuse.model.publish`, whose last step is the one rename of the graph.
"""

from __future__ import annotations

__all__ = [
    "EXTERNAL_DATA_THRESHOLD",
    "check_model_file",
    "file_bytes",
    "load_model",
    "model_files",
    "parameter_count",
    "save_model",
    "weight_bytes",
]

import os
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from layerfuse.errors import InvalidModelError
from layerfuse.files import staging_dir
from layerfuse.model.publish import model_files, publish_model

# Models whose weights exceed this are written with external data (one ``<name>.data`` file);
# smaller ones keep weights inside the .onnx file so a test model is a single file.
EXTERNAL_DATA_THRESHOLD = 32 * 1024 * 1024
# Checker complaints that only mean "an op this onnx version does not know".
_RUNTIME_SPECIFIC = ("No Op registered for", "No opset import for domain")


def _tensor_byte_length(tensor: onnx.TensorProto) -> int | None:
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, TypeError):
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    return count * itemsize


def _check_external_data(proto: onnx.ModelProto, model_path: Path) -> None:
    base = model_path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in proto.graph.initializer:
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if not location or os.path.isabs(location) or not target.is_relative_to(base):
            raise InvalidModelError(
                f"{model_path}: initializer '{tensor.name}' points to external data "
                f"'{location}' outside the model folder {base}"
            )
        if target not in sizes:
            if not target.is_file():
                raise InvalidModelError(
                    f"{model_path}: external data file '{location}' is missing "
                    f"(it must sit next to the model)"
                )
            sizes[target] = target.stat().st_size
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else _tensor_byte_length(tensor)
        if length is not None and offset + length > sizes[target]:
            raise InvalidModelError(
                f"{model_path}: external data file '{location}' is truncated "
                f"({sizes[target]} bytes, initializer '{tensor.name}' needs {offset + length})"
            )


def _validated_proto(model_path: Path) -> onnx.ModelProto:
    """The graph (weights not read) of a file that passed every check onnx would fail late."""
    if not model_path.exists():
        raise InvalidModelError(f"{model_path}: no such file")
    if not model_path.is_file():
        raise InvalidModelError(f"{model_path}: not a file (give the .onnx file, not a folder)")
    try:
        proto = onnx.load(model_path, load_external_data=False)
    except (DecodeError, RuntimeWarning, ValueError, OSError) as exc:
        raise InvalidModelError(
            f"{model_path}: not a valid ONNX file (corrupt or truncated: {exc})"
        ) from None
    if not proto.graph.node:
        raise InvalidModelError(f"{model_path}: not a valid ONNX model (the graph has no nodes)")
    _check_external_data(proto, model_path)
    try:
        onnx.checker.check_model(str(model_path))
    except onnx.checker.ValidationError as exc:
        first_line = str(exc).strip().splitlines()[0]
        # onnxruntime registers contrib ops (SimplifiedLayerNormalization, ...) in the default
        # domain; graphs its optimizer wrote are valid for it but unknown to the checker.
        if not any(marker in first_line for marker in _RUNTIME_SPECIFIC):
            raise InvalidModelError(f"{model_path}: invalid ONNX model ({first_line})") from None
    return proto


def check_model_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a loadable model, else :class:`InvalidModelError` saying why.

    Commands run this on every model they are given before anything else reads it, so a
    wrong file is one line up front instead of a traceback from whichever reader came first.
    """
    _validated_proto(Path(path))
    return Path(path)


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model lazily, or raise :class:`InvalidModelError` saying what is wrong."""
    model_path = Path(path)
    model = ir.serde.deserialize_model(_validated_proto(model_path))
    ir.external_data.set_base_dir(model.graph, model_path.parent)
    return model


def weight_bytes(model: ir.Model) -> int:
    """Bytes held by the main graph's initializers, each counted once however often it is read."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def parameter_count(model: ir.Model) -> int:
    """Elements of the main graph's initializers, each counted once however often it is read."""
    return int(
        sum(
            value.const_value.size
            for value in model.graph.initializers.values()
            if value.const_value is not None
        )
    )


def file_bytes(model_path: str | os.PathLike) -> int:
    """Bytes of a model on disk: the .onnx file and every external data file it reads."""
    return sum(path.stat().st_size for path in model_files(model_path) if path.is_file())


def save_model(
    model: ir.Model, path: str | os.PathLike, *, external_data: bool | None = None
) -> Path:
    """Write ``model`` to ``path`` atomically and return the path.

    ``external_data=None`` picks external data when the weights exceed
    :data:`EXTERNAL_DATA_THRESHOLD`. The destination may be the file the model was loaded
    from: lazy tensors keep reading the old files, which :func:`publish_model` never writes
    over (the new weights take a free name; see :mod:`layerfuse.model.publish`).
    """
    model_path = Path(path)
    use_external = (
        weight_bytes(model) > EXTERNAL_DATA_THRESHOLD if external_data is None else external_data
    )
    with staging_dir(model_path.parent) as tmp:
        staged = tmp / model_path.name
        if use_external:
            ir.save(model, staged, external_data=model_path.name + ".data")
        else:
            # Small models keep their weights inline; lazy external tensors are read into memory.
            ir.save(ir.external_data.load_to_model(model), staged)
        return publish_model(staged, model_path)
