"""The one place that builds onnxruntime sessions.

Provider choice: ``auto`` takes CUDA when the installed onnxruntime has it (onnxruntime-gpu)
and says so when it falls back to CPU. Asking for ``cuda`` where it is missing is an error,
not a silent CPU run that would make a benchmark lie.

Pre-packing (CPU MatMul/Gemm copy each constant weight into a packed layout at load): since
onnxruntime 1.21 a session keeps ONE packed copy per distinct packed content (the packed bytes
are hashed, ``session_state.cc``), so a weight tied across k MatMuls is packed once and tying
keeps its whole saving with pre-packing on. What made tied stacks look duplicated was glibc:
every consumer still packs a temporary copy that ORT frees after the lookup, and glibc keeps
those weight-sized blocks in its heap (RSS, not live memory) until ``malloc_trim``. The policy
(``prepacking=None``, ``--prepacking auto``) is therefore:

- onnxruntime >= 1.21: pre-packing on for every graph, and the freed packing buffers handed
  back to the OS right after the session is built (``malloc_trim(0)`` on glibc; other
  allocators return blocks this large when freed). Memory equals pre-packing off, latency is
  pre-packed (``benchmarks/results/prepacking.md``).
- older onnxruntime: each kernel owns its packed copy (v1.13-1.20 pass no cache to
  ``PrePack``), so pre-packing is off for graphs whose MatMul/Gemm nodes share a weight.
"""

from __future__ import annotations

__all__ = [
    "PREPACKING",
    "PROVIDERS",
    "available_providers",
    "create_session",
    "default_prepacking",
    "prepacked_weights_deduplicated",
    "release_freed_memory",
    "resolve_provider",
    "session_for_ir",
]

import ctypes
import os
import sys
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxruntime as ort

from layerfuse.errors import LayerfuseError
from layerfuse.model.stats import shared_matmul_weights
from layerfuse.runtime.widening import apply_lean_options, wants_lean

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# Command-line spellings of ``create_session(prepacking=...)``; ``auto`` is layerfuse's policy.
PREPACKING = {"auto": None, "on": True, "off": False}
_fallback_reported = False
# First onnxruntime whose sessions share pre-packed weights of equal content (PR #23069).
_PREPACK_DEDUP_VERSION = (1, 21)


def prepacked_weights_deduplicated(version: str | None = None) -> bool:
    """Whether onnxruntime ``version`` (default: the loaded one) keeps one pre-packed copy per
    distinct weight in a session."""
    parts = []
    for part in (version or ort.__version__).split(".")[:2]:
        digits = "".join(ch for ch in part if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts) >= _PREPACK_DEDUP_VERSION


def default_prepacking(model: ir.Model) -> bool:
    """layerfuse's pre-packing setting for ``model`` (``auto``): see the module docstring."""
    return prepacked_weights_deduplicated() or not shared_matmul_weights(model)


def release_freed_memory() -> bool:
    """Give free heap pages back to the OS (glibc ``malloc_trim(0)``); False where there is
    no such call (other C libraries, Windows, macOS), whose allocators map and unmap blocks
    the size of a packed weight directly.

    Costs a few milliseconds once per session and frees nothing that is in use, so it is
    safe in a server process too.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True


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


_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


def _options(optimization: str, threads: int | None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = _LEVELS[optimization]
    if threads:
        options.intra_op_num_threads = threads
    return options


def create_session(
    model: str | os.PathLike | onnx.ModelProto,
    *,
    provider: str = "auto",
    threads: int | None = None,
    prepacking: bool | None = None,
    external_data_dir: str | os.PathLike | None = None,
    optimization: str = "all",
    release_memory: bool = True,
    provider_options: dict | None = None,
    lean: bool | None = None,
) -> ort.InferenceSession:
    """Build a session for a model file, or for an in-memory proto whose external data lives in
    ``external_data_dir`` (used to run a modified copy of a graph without copying weights).

    ``prepacking=None`` follows :func:`default_prepacking`; ``release_memory=False`` skips
    :func:`release_freed_memory` (only to measure what it saves). ``provider_options`` go to
    the chosen provider (e.g. ``{"enable_cuda_graph": "1"}`` on CUDA). ``lean`` is for fp16/bf16
    weights on CPU (:mod:`layerfuse.runtime.widening`): True casts them as they run whenever
    the graph has them, None only where their fp32 copies would not fit, False never.
    """
    options = _options(optimization, threads)
    if isinstance(model, onnx.ModelProto):
        payload: str | bytes = model.SerializeToString()
        if external_data_dir is not None:
            options.add_session_config_entry(
                "session.model_external_initializers_file_folder_path",
                str(Path(external_data_dir).resolve()),
            )
    else:
        payload = str(model)
    if prepacking is None and not prepacked_weights_deduplicated():
        # Read the graph only when the policy needs it: a file without external data would
        # otherwise be loaded whole once here and again by onnxruntime.
        graph = (
            ir.serde.deserialize_model(model)
            if isinstance(model, onnx.ModelProto)
            else ir.load(model)
        )
        prepacking = default_prepacking(graph)
    if prepacking is False:
        options.add_session_config_entry("session.disable_prepacking", "1")
    chosen = resolve_provider(provider)
    if chosen == PROVIDERS["cpu"] and wants_lean(model, lean):
        apply_lean_options(options)
    providers: list = [(chosen, dict(provider_options)) if provider_options else chosen]
    if chosen != PROVIDERS["cpu"]:
        providers.append(PROVIDERS["cpu"])
    try:
        session = ort.InferenceSession(payload, options, providers=providers)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LayerfuseError(f"onnxruntime cannot load the model: {first_line}") from None
    if release_memory:
        release_freed_memory()
    return session


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
