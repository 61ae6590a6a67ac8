"""Small hand-built ONNX graphs for cases exporters do not produce (mixed FF widths...).

``ff_stack`` builds a pre-norm residual stack of FF-only blocks:
``h = h + FF(RMSNorm(h))`` per block, reading a float input ``hidden [batch, seq, d]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


def ff_stack(
    path: Path, widths: list[int], model_dim: int = 16, kind: str = "swiglu", seed: int = 0
) -> Path:
    rng = np.random.default_rng(seed)
    nodes, initializers = [], []

    def weight(name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        data = (rng.standard_normal(shape) * scale).astype(np.float32)
        initializers.append(helper.make_tensor(name, TensorProto.FLOAT, shape, data.ravel()))
        return name

    hidden = "hidden"
    for block, width in enumerate(widths):
        p = f"b{block}"
        gamma = weight(f"{p}.norm", (model_dim,), 0.1)
        initializers[-1] = helper.make_tensor(
            gamma, TensorProto.FLOAT, (model_dim,), 1.0 + rng.standard_normal(model_dim) * 0.1
        )
        nodes.append(
            helper.make_node(
                "RMSNormalization", [hidden, gamma], [f"{p}.normed"], axis=-1, epsilon=1e-6
            )
        )
        if kind == "swiglu":
            nodes += [
                helper.make_node(
                    "MatMul", [f"{p}.normed", weight(f"{p}.gate", (model_dim, width))], [f"{p}.g"]
                ),
                helper.make_node("Sigmoid", [f"{p}.g"], [f"{p}.sig"]),
                helper.make_node("Mul", [f"{p}.g", f"{p}.sig"], [f"{p}.silu"]),
                helper.make_node(
                    "MatMul", [f"{p}.normed", weight(f"{p}.up", (model_dim, width))], [f"{p}.u"]
                ),
                helper.make_node("Mul", [f"{p}.silu", f"{p}.u"], [f"{p}.h"]),
            ]
        else:
            nodes += [
                helper.make_node(
                    "MatMul", [f"{p}.normed", weight(f"{p}.up", (model_dim, width))], [f"{p}.u0"]
                ),
                helper.make_node("Add", [f"{p}.u0", weight(f"{p}.up_b", (width,))], [f"{p}.u"]),
                helper.make_node("Relu", [f"{p}.u"], [f"{p}.h"]),
            ]
        nodes += [
            helper.make_node(
                "MatMul", [f"{p}.h", weight(f"{p}.down", (width, model_dim))], [f"{p}.d"]
            ),
            helper.make_node("Add", [hidden, f"{p}.d"], [f"{p}.out"]),
        ]
        hidden = f"{p}.out"
    nodes.append(helper.make_node("Identity", [hidden], ["output"]))
    graph = helper.make_graph(
        nodes,
        "ff_stack",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", model_dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "seq", model_dim])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, path)
    return path
