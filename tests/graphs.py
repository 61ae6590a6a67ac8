"""Small hand-built ONNX graphs for cases exporters do not produce (mixed FF widths...).

``ff_stack`` builds a pre-norm residual stack of FF-only blocks:
``h = h + FF(RMSNorm(h))`` per block, reading a float input ``hidden [batch, seq, d]``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper


class _Builder:
    """Nodes and random initializers of a graph under construction."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list = []
        self.initializers: list = []

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.3) -> str:
        data = (self.rng.standard_normal(shape) * scale).astype(np.float32)
        self.initializers.append(helper.make_tensor(name, TensorProto.FLOAT, shape, data.ravel()))
        return name

    def norm(self, hidden: str, p: str, model_dim: int) -> str:
        """RMSNorm of ``hidden`` with a gain near 1; returns the normalized tensor's name."""
        gamma = self.weight(f"{p}.norm", (model_dim,), 0.1)
        self.initializers[-1] = helper.make_tensor(
            gamma, TensorProto.FLOAT, (model_dim,), 1.0 + self.rng.standard_normal(model_dim) * 0.1
        )
        self.nodes.append(
            helper.make_node(
                "RMSNormalization", [hidden, gamma], [f"{p}.normed"], axis=-1, epsilon=1e-6
            )
        )
        return f"{p}.normed"

    def ff_hidden(self, p: str, model_dim: int, width: int, kind: str) -> str:
        """The FF's hidden activations on ``{p}.normed``: SwiGLU, or Linear + bias + ReLU."""
        if kind == "swiglu":
            self.nodes += [
                helper.make_node(
                    "MatMul",
                    [f"{p}.normed", self.weight(f"{p}.gate", (model_dim, width))],
                    [f"{p}.g"],
                ),
                helper.make_node("Sigmoid", [f"{p}.g"], [f"{p}.sig"]),
                helper.make_node("Mul", [f"{p}.g", f"{p}.sig"], [f"{p}.silu"]),
                helper.make_node(
                    "MatMul",
                    [f"{p}.normed", self.weight(f"{p}.up", (model_dim, width))],
                    [f"{p}.u"],
                ),
                helper.make_node("Mul", [f"{p}.silu", f"{p}.u"], [f"{p}.h"]),
            ]
        else:
            self.nodes += [
                helper.make_node(
                    "MatMul",
                    [f"{p}.normed", self.weight(f"{p}.up", (model_dim, width))],
                    [f"{p}.u0"],
                ),
                helper.make_node(
                    "Add", [f"{p}.u0", self.weight(f"{p}.up_b", (width,))], [f"{p}.u"]
                ),
                helper.make_node("Relu", [f"{p}.u"], [f"{p}.h"]),
            ]
        return f"{p}.h"

    def ff_block(self, hidden: str, p: str, model_dim: int, width: int, kind: str) -> str:
        """``hidden + FF(RMSNorm(hidden))``; returns the block output's name."""
        self.norm(hidden, p, model_dim)
        activations = self.ff_hidden(p, model_dim, width, kind)
        self.nodes += [
            helper.make_node(
                "MatMul", [activations, self.weight(f"{p}.down", (width, model_dim))], [f"{p}.d"]
            ),
            helper.make_node("Add", [hidden, f"{p}.d"], [f"{p}.out"]),
        ]
        return f"{p}.out"


def ff_stack(
    path: Path, widths: list[int], model_dim: int = 16, kind: str = "swiglu", seed: int = 0
) -> Path:
    builder = _Builder(seed)
    hidden = "hidden"
    for block, width in enumerate(widths):
        hidden = builder.ff_block(hidden, f"b{block}", model_dim, width, kind)
    builder.nodes.append(helper.make_node("Identity", [hidden], ["output"]))
    graph = helper.make_graph(
        builder.nodes,
        "ff_stack",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["batch", "seq", model_dim])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", "seq", model_dim])],
        builder.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
    model.ir_version = 10
    onnx.save(model, path)
    return path
