"""fp16/bf16 weights on onnxruntime's CPU provider: the widened copies, and a lean session.

The CPU provider has no 16-bit MatMul kernels on x86: it inserts Casts to fp32 and, when the
graph is optimized at load, folds every 16-bit weight into an fp32 copy, so a session holds
the weights three times over (a 0.70 GB fp16 model peaks at 1.47 GiB; the Llama-shaped 8 GiB
fp16 model of ``big_models.md`` at 17.4 GiB). A *lean* session leaves those Casts to run:

- graph optimization ``basic``, at which onnxruntime folds none of the inserted Casts;
- priority-based execution order: topological order runs every weight's Cast first (they
  depend on nothing), so all fp32 copies would be alive at once; by priority each Cast runs
  when its consumer is next;
- no CPU memory arena, which would keep the peak set of copies reserved.

The weights then stay mapped in their 16-bit file and about one fp32 copy lives at a time
(0.89 GiB for the 0.70 GB model), at the price of casting every weight on every run:
right for calibration, which runs a few batches, and for a bench whose widened model would
not fit, where it is said on stderr.
"""

from __future__ import annotations

__all__ = ["apply_lean_options", "available_memory", "wants_lean", "widened_bytes"]

import math
import os
import sys

import onnx
import onnxruntime as ort

from layerfuse.runtime.procfs import proc_bytes

_HALF = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
# A graph file larger than this holds its weights inline: reading it only to size its
# widening would load the weights once more, and inline graphs stay under 2 GB anyway.
_GRAPH_ONLY_BYTES = 64 << 20
_reported = False


def widened_bytes(proto: onnx.ModelProto) -> int:
    """Bytes of the fp32 copies onnxruntime's CPU provider makes of the 16-bit weights."""
    return sum(
        4 * math.prod(tensor.dims)
        for tensor in proto.graph.initializer
        if tensor.data_type in _HALF
    )


def available_memory() -> int | None:
    """The kernel's estimate of memory available without swapping (Linux), else None."""
    return proc_bytes("/proc/meminfo", "MemAvailable")


def _graph_of(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto | None:
    if isinstance(model, onnx.ModelProto):
        return model
    if os.path.getsize(model) > _GRAPH_ONLY_BYTES:
        return None
    return onnx.load(model, load_external_data=False)


def wants_lean(model: str | os.PathLike | onnx.ModelProto, lean: bool | None) -> bool:
    """Whether a CPU session for ``model`` should be lean.

    ``lean=True`` (calibration) asks for it whenever the graph has 16-bit weights; ``None``
    decides by memory: lean only when the widened copies would take more than half of what
    the machine has available, since lean runs are slower.
    """
    if lean is False:
        return False
    graph = _graph_of(model)
    widened = widened_bytes(graph) if graph is not None else 0
    if not widened:
        return False
    if lean:
        return True
    available = available_memory()
    if available is None or widened <= available // 2:
        return False
    global _reported
    if not _reported:
        print(
            f"layerfuse: the fp32 copies onnxruntime's CPU provider makes of the 16-bit "
            f"weights ({widened / 2**30:.1f} GiB) would not fit in "
            f"{available / 2**30:.1f} GiB available; casting them as they run (slower)",
            file=sys.stderr,
        )
        _reported = True
    return True


def apply_lean_options(options: ort.SessionOptions) -> None:
    """Set ``options`` for a lean session (see the module docstring)."""
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    options.enable_cpu_mem_arena = False
