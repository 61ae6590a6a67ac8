"""Fuse runs of consecutive FFN-only blocks into one wide FFN (NVIDIA's FFN Fusion).

A run of pre-norm blocks ``h <- h + FFN_k(norm_k(h))`` for k = a..b is replaced by the parallel
form ``h <- h + sum_k FFN_k(norm_k(h_a))``: every FFN reads the run's input. Because the
norms differ only by their gains (and LayerNorm biases), one gain-free norm serves all of them
once each gain is folded into its own FFN's input rows (``diag(g) W``, plus ``beta W`` as a bias).
The FFNs then concatenate along the hidden dimension into one
``layerfuse.Fused*`` node (see :mod:`layerfuse.passes.fuse.functions`) and one residual Add.

Pre-condition: no block inside a run (after its first) still has attention, all FFNs of a
run are pre-norm, of one kind and one norm epsilon.
"""

from __future__ import annotations

__all__ = ["FuseFeedForwardsPass", "fused_weights", "parallel_reference"]

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.graph import bypass, constant_array
from layerfuse.passes.detect import Block, detect_structure
from layerfuse.passes.fuse.functions import DOMAIN, function_name, fused_function
from layerfuse.passes.merge.ff_weights import ff_forward, read_ff_weights

_PREFIX = "layerfuse.fused"


def _check_group(blocks: list[Block], first: int, last: int) -> None:
    run = blocks[first : last + 1]
    for block in run[1:]:
        if block.attention is not None:
            raise PlanError(
                f"block {block.index} still has attention: blocks {first}-{last} are not a run "
                f"of FFN-only blocks (remove attention first, e.g. --drop-attention)"
            )
    for block in run:
        wiring = block.ff_wiring
        if wiring.residual is not None and wiring.residual.node.op_type != "Add":
            raise PlanError(
                f"block {block.index}: its residual Add is fused into "
                f"{wiring.residual.node.op_type}; fuse before onnxruntime's optimizer runs"
            )
        if wiring.norm_position != "pre" or wiring.norm is None or wiring.residual is None:
            raise PlanError(
                f"block {block.index}: FFN fusion needs pre-norm FFNs with a residual Add "
                f"(found norm position {wiring.norm_position})"
            )
        if block.ff.neuron_parameters:
            raise PlanError(f"block {block.index}: constants inside the activation are not fused")
        if block.ff.gated and (
            block.ff.linears["down"].bias is not None
            or any(lin.bias is not None for lin in block.ff.linears.values())
        ):
            raise PlanError(f"block {block.index}: gated FFNs with biases are not fused")
    kinds = {(b.ff.kind, b.ff_wiring.norm.kind) for b in run}
    if len(kinds) != 1:
        raise PlanError(f"blocks {first}-{last} mix FFN or norm kinds: {sorted(kinds)}")
    epsilons = {b.ff_wiring.norm.epsilon for b in run}
    if None in epsilons or max(epsilons) - min(epsilons) > 1e-12:
        raise PlanError(f"blocks {first}-{last}: norm epsilons differ or are unknown")
    if run[0].ff.gated and run[0].ff_wiring.norm.bias is not None:
        raise PlanError(f"block {first}: gated FFNs behind a biased norm are not fused")


def fused_weights(run: list[Block]) -> dict[str, np.ndarray]:
    """W_in (gates then ups, or ups), W_down stacked, biases: norm gains folded in."""
    gates, ups, downs, in_biases = [], [], [], []
    down_bias = 0.0
    for block in run:
        weights = read_ff_weights(block.ff)
        norm = block.ff_wiring.norm
        gain = constant_array(norm.weight)
        gain = np.ones(block.ff.model_dim, np.float32) if gain is None else gain.reshape(-1)
        shift = constant_array(norm.bias)
        shift = None if shift is None else shift.reshape(-1).astype(np.float64)
        up = weights.matrices["up"].astype(np.float64)
        ups.append(gain[:, None] * up)
        if "gate" in weights.matrices:
            gates.append(gain[:, None] * weights.matrices["gate"].astype(np.float64))
        bias = weights.biases.get("up", np.zeros(up.shape[1]))
        in_biases.append(bias + (shift @ up if shift is not None else 0.0))
        downs.append(weights.matrices["down"].astype(np.float64))
        down_bias = down_bias + weights.biases.get("down", 0.0)
    result = {
        "w_in": np.concatenate(gates + ups, axis=1),
        "w_down": np.concatenate(downs, axis=0),
    }
    if not gates:
        result["b_in"] = np.concatenate(in_biases)
        result["b_down"] = np.broadcast_to(down_bias, (run[0].ff.model_dim,)).copy()
    return result


def _initializer(graph: ir.Graph, name: str, data: np.ndarray, dtype: ir.DataType) -> ir.Value:
    tensor = ir.tensor(np.ascontiguousarray(data.astype(dtype.numpy())), name=name)
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _shared_norm(graph: ir.Graph, x: ir.Value, block: Block, prefix: str) -> tuple[list, ir.Value]:
    """The run's norm without its gain (and bias): the same arithmetic every block used."""
    norm = block.ff_wiring.norm
    width = block.ff.model_dim
    epsilon = float(norm.epsilon)
    if norm.kind == "layer":
        ones = _initializer(graph, f"{prefix}.norm.scale", np.ones(width), ir.DataType.FLOAT)
        node = ir.node(
            "LayerNormalization", [x, ones], {"axis": -1, "epsilon": epsilon}, name=f"{prefix}.norm"
        )
        return [node], node.outputs[0]
    axes = _initializer(graph, f"{prefix}.norm.axes", np.array([-1]), ir.DataType.INT64)
    two = _initializer(graph, f"{prefix}.norm.two", np.array(2.0), ir.DataType.FLOAT)
    eps = _initializer(graph, f"{prefix}.norm.eps", np.array(epsilon), ir.DataType.FLOAT)
    square = ir.node("Pow", [x, two], name=f"{prefix}.norm.pow")
    mean = ir.node(
        "ReduceMean", [square.outputs[0], axes], {"keepdims": 1}, name=f"{prefix}.norm.mean"
    )
    shifted = ir.node("Add", [mean.outputs[0], eps], name=f"{prefix}.norm.add")
    root = ir.node("Sqrt", [shifted.outputs[0]], name=f"{prefix}.norm.sqrt")
    inverse = ir.node("Reciprocal", [root.outputs[0]], name=f"{prefix}.norm.reciprocal")
    scaled = ir.node("Mul", [x, inverse.outputs[0]], name=f"{prefix}.norm.mul")
    return [square, mean, shifted, root, inverse, scaled], scaled.outputs[0]


class FuseFeedForwardsPass(ir.passes.InPlacePass):
    """Replace each run ``(first, last)`` of FFN-only blocks by one wide FFN node."""

    def __init__(self, groups: list[tuple[int, int]]) -> None:
        super().__init__()
        self.groups = [tuple(group) for group in groups]

    def requires(self, model: ir.Model) -> None:
        blocks = detect_structure(model).blocks
        for first, last in self.groups:
            if not 0 <= first <= last < len(blocks):
                raise PlanError(f"run {first}-{last} is outside blocks 0-{len(blocks) - 1}")
            _check_group(blocks, first, last)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks = detect_structure(model).blocks
        for first, last in self.groups:
            run = blocks[first : last + 1]
            prefix = f"{_PREFIX}.{first}-{last}"
            kind = run[0].ff.kind
            dtype = run[0].ff.linears["down"].consumed_dtype()
            x = run[0].ff_wiring.norm.input
            nodes, normalized = _shared_norm(graph, x, run[0], prefix)
            weights = fused_weights(run)
            inputs = [normalized] + [
                _initializer(graph, f"{prefix}.{name}", weights[name], dtype)
                for name in ("w_in", "w_down", "b_in", "b_down")
                if name in weights
            ]
            fused = ir.node(function_name(kind), inputs, domain=DOMAIN, name=prefix)
            fused.outputs[0].name = f"{prefix}.ffn"
            residual = ir.node("Add", [x, fused.outputs[0]], name=f"{prefix}.residual")
            residual.outputs[0].name = f"{prefix}.out"
            last_stream = run[-1].ff_wiring.residual.output
            residual.outputs[0].type = last_stream.type
            residual.outputs[0].shape = last_stream.shape
            graph.extend([*nodes, fused, residual])
            bypass(last_stream, residual.outputs[0])
            function = fused_function(kind)
            model.functions.setdefault(function.identifier(), function)
        if self.groups:
            model.opset_imports.setdefault(DOMAIN, 1)
        common_passes.RemoveUnusedNodesPass()(model)
        graph.sort()
        return ir.passes.PassResult(model, modified=bool(self.groups))


def parallel_reference(run: list[Block], x: np.ndarray) -> np.ndarray:
    """What the fused node computes, from the original weights, in numpy (for checks)."""
    total = 0.0
    for block in run:
        norm = block.ff_wiring.norm
        values = x.astype(np.float64)
        if norm.kind == "layer":
            centered = values - values.mean(axis=-1, keepdims=True)
            normalized = centered / np.sqrt((centered**2).mean(-1, keepdims=True) + norm.epsilon)
        else:
            normalized = values / np.sqrt((values**2).mean(-1, keepdims=True) + norm.epsilon)
        gain = constant_array(norm.weight)
        normalized = normalized * (1.0 if gain is None else gain.reshape(-1))
        shift = constant_array(norm.bias)
        if shift is not None:
            normalized = normalized + shift.reshape(-1)
        total = total + ff_forward(read_ff_weights(block.ff), normalized)
    return total
