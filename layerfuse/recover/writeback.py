"""Put trained weights back into the optimized graph: same initializers, same layout, checked.

There is no second export: each trained parameter replaces the data of the initializer of
the same name in the optimized model (same dtype, same shape, so the same layout), and
nothing else changes. A tied initializer was one parameter, so it is written once and stays
tied. Before anything is written, three things are checked:

- the initializers (names, dtypes, shapes, so the bytes of unique weights) are unchanged;
- every MatMul/Gemm still reads the same weight initializer (ties neither undone nor made);
- onnxruntime, running the rewritten graph with graph optimizations off (the graph as
  written, not onnxruntime's fused rewrite of it), matches the trained torch module within
  ``1e-4`` relative to the output's magnitude (absolute 1e-4 for outputs of order one; on
  SmolLM2's logits of size ~40 float32 summation order alone differs by ~1e-4).

The model is saved into a temporary folder beside the output, verified there and moved into
place, so a failed check leaves nothing behind.
"""

from __future__ import annotations

__all__ = ["TOLERANCE", "graph_invariants", "write_back"]

import json
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from layerfuse.errors import LayerfuseError
from layerfuse.files import staging_dir
from layerfuse.model.graph import weight_source
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.publish import publish_model
from layerfuse.model.stats import shared_matmul_weights
from layerfuse.recover.graph_module import GraphModule
from layerfuse.runtime.calibration import adapt_feeds
from layerfuse.runtime.session import create_session

TOLERANCE = 1e-4
RECOVERY_PROPERTY = "layerfuse.recovery"


def graph_invariants(model: ir.Model) -> dict:
    """What write-back must not change: initializer signatures and who reads which weight."""
    readers = {}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
            source = weight_source(node.inputs[1])
            if source is not None:
                readers[node.name] = source.initializer.name
    return {
        "initializers": {
            name: (str(value.dtype), tuple(value.shape))
            for name, value in model.graph.initializers.items()
        },
        "matmul_weights": readers,
        "shared": shared_matmul_weights(model),
    }


def _replace_weights(model: ir.Model, student: GraphModule) -> None:
    initializers = model.graph.initializers
    for name, parameter in student.named_weights().items():
        value = initializers.get(name)
        if value is None or value.const_value is None:
            raise LayerfuseError(f"trained weight '{name}' is not an initializer of the graph")
        dtype = value.const_value.dtype.numpy()
        data = parameter.detach().cpu().numpy().astype(dtype)
        if data.shape != tuple(value.shape):
            raise LayerfuseError(
                f"trained weight '{name}' has shape {data.shape}, the graph {tuple(value.shape)}"
            )
        value.const_value = ir.tensor(np.ascontiguousarray(data), name=name)


def _verify(path: Path, student: GraphModule, feeds: dict[str, np.ndarray]) -> float:
    session = create_session(path, provider="cpu", optimization="disable")
    feeds = adapt_feeds(session, feeds)
    reference = session.run(None, feeds)[0]
    student.eval()
    with torch.no_grad():
        inputs = {n: torch.from_numpy(feeds[n]).to(student.device) for n in student.input_names}
        trained = student(inputs)[0][0].float().cpu().numpy()
    difference = float(np.max(np.abs(trained - reference)))
    allowed = TOLERANCE * max(1.0, float(np.max(np.abs(reference))))
    if not difference <= allowed:
        raise LayerfuseError(
            f"the written graph does not reproduce the trained model in onnxruntime "
            f"(max |difference| {difference:.3g} > {allowed:.3g}); nothing was written"
        )
    return difference


def write_back(
    optimized: str | os.PathLike,
    student: GraphModule,
    output: str | os.PathLike,
    *,
    verify_feeds: dict[str, np.ndarray],
    summary: dict,
) -> float:
    """Write ``optimized`` with ``student``'s weights to ``output``; the verified max diff."""
    output = Path(output)
    model = load_model(optimized)
    before = graph_invariants(model)
    _replace_weights(model, student)
    if graph_invariants(model) != before:
        raise LayerfuseError("write-back changed the graph's initializers or weight readers")
    model.metadata_props[RECOVERY_PROPERTY] = json.dumps(summary, sort_keys=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    with staging_dir(output.parent, "recover") as tmp:
        staged = save_model(model, tmp / output.name)
        difference = _verify(staged, student, verify_feeds)
        publish_model(staged, output)
    carry_manifest(optimized, output)
    return difference
