"""The one place that builds onnxruntime sessions.

Provider choice: ``auto`` takes CUDA when the installed onnxruntime has it (onnxruntime-gpu)
and says so when it falls back to CPU. Asking for ``cuda`` where it is missing is an error,
not a silent CPU run that would make a benchmark lie.

Pre-packing: ORT's CPU MatMul copies each constant weight into a packed layout per node, so a
weight tied across k FFs is packed k times and the memory saving of tying mostly disappears
(measured: 12 tied FFs kept 186 of 394 MiB). ORT shares packed weights only through a
container its Python API does not expose, so for graphs where one initializer feeds several
MatMul/Gemm nodes pre-packing is turned off by default (``prepacking=None``).
"""

from __future__ import annotations

__all__ = [
    "PREPACKING",
    "PROVIDERS",
    "available_providers",
    "create_session",
    "resolve_provider",
    "session_for_ir",
]

import os
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from layerfuse.errors import LayerfuseError
from layerfuse.model.stats import shared_matmul_weights

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Command-line spellings of ``create_session(prepacking=...)``; ``auto`` is layerfuse's policy.
PREPACKING = {"auto": None, "on": True, "off": False}
_fallback_reported = False


def available_providers() -> list[str]:
    return list(ort.get_available_providers())


def resolve_provider(name: str = "auto") -> str:
    """Map ``auto``/``cpu``/``cuda`` to an ORT provider name available in this install."""
    global _fallback_reported
    name = name.lower()
    available = available_providers()
    if name == "auto":
        if PROVIDERS["cuda"] in available:
            return PROVIDERS["cuda"]
        if not _fallback_reported:
            print(
                "layerfuse: CUDA is not available in this onnxruntime "
                f"({', '.join(available)}); running on CPU",
                file=sys.stderr,
            )
            _fallback_reported = True
        return PROVIDERS["cpu"]
    if name not in PROVIDERS:
        raise LayerfuseError(f"unknown provider '{name}' (choose auto, cpu or cuda)")
    if PROVIDERS[name] not in available:
        raise LayerfuseError(
            f"provider '{name}' is not available in this onnxruntime "
            f"(has: {', '.join(available)}); install onnxruntime-gpu for CUDA"
        )
    return PROVIDERS[name]


def create_session(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    provider: str = "auto",
    threads: int | None = None,
    prepacking: bool | None = None,
    external_data_dir: str | os.PathLike | None = None,
    optimization: str = "all",
) -> ort.InferenceSession:
    """Build a session for a model file, or for an in-memory proto whose external data lives in
    ``external_data_dir`` (used to run a modified copy of a graph without copying weights)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options.graph_optimization_level = levels[optimization]
    if threads:
        options.intra_op_num_threads = threads
    if isinstance(model, onnx.ModelProto):
        payload: str | bytes = model.SerializeToString()
        if external_data_dir is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path",
                str(Path(external_data_dir).resolve()),
            )
    else:
        payload = str(model)
    if prepacking is None:
        # Read the graph only when the policy needs it: a file without external data would
        # otherwise be loaded whole once here and again by onnxruntime.
        graph = (
            ir.serde.deserialize_model(model)
            if isinstance(model, onnx.ModelProto)
            else ir.load(model)
        )
        prepacking = not shared_matmul_weights(graph)
    if not prepacking:
        options.add_session_config_entry("session.disable_prepacking", "1")
    providers = [resolve_provider(provider)]
    if providers[0] != PROVIDERS["cpu"]:
        providers.append(PROVIDERS["cpu"])
    try:
        return ort.InferenceSession(payload, options, providers=providers)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerfuseError(f"onnxruntime cannot load the model: {first_line}") from None


def session_for_ir(
    model: ir.Model, external_data_dir: str | os.PathLike, **options
) -> ort.InferenceSession:
    """A session for an in-memory rewrite of a model whose untouched weights stay on disk.

    New tensors (merged, fused) travel inline in the serialized graph; lazily loaded external
    tensors keep pointing into ``external_data_dir``, so no weights are copied or written.
    """
    return create_session(
        ir.serde.serialize_model(model), external_data_dir=external_data_dir, **options
    )
