"""Fuse runs of consecutive FFN-only blocks into one wide FFN (NVIDIA's FFN Fusion).

The plan's attention sublayers are removed first (as pruning does). A run of pre-norm blocks
``h <- h + FFN_k(norm_k(h))`` for k = a..b is then replaced by the parallel form
``h <- h + sum_k FFN_k(norm_k(h_a))``: every FFN reads the run's input. Because the norms
differ only by their gains (and LayerNorm biases), one gain-free norm serves all of them once
each gain is folded into its own FFN's input rows (``diag(g) W``, plus ``beta W`` as a bias).
The FFNs then concatenate along the hidden dimension into one ``layerfuse.Fused*`` node (see
:mod:`layerfuse.passes.fuse.functions`) and one residual Add.

Residual norms fused by onnxruntime (``Skip*Norm``) are split into Add + norm first.
Pre-condition: after the attention removal no block inside a run (after its first) has
attention; all FFNs of a run are pre-norm, of one kind and one norm epsilon. Post-norm FFNs
(BERT) are refused, and so are FFNs with output norms (Gemma-2/3's sandwich, OLMo-2): each
normalizes its own output, so their sum is not one wide FFN. Parallel blocks (GPT-J, Phi-2,
GPT-NeoX, Falcon) fuse: once its attention is removed a parallel block is an FFN-only block,
and a run's first block may keep its attention branch, the fused FFN taking its FF's place
(``x + attn(ln(x)) + sum_k FFN_k(norm_k(x))``). Post-condition:
the model has exactly the removed attention sublayers and the fused FFNs fewer.
"""

from __future__ import annotations

__all__ = ["FuseFeedForwardsPass", "fused_weights"]

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.graph import bypass, constant_array
from layerfuse.passes.base import PlanPass
from layerfuse.passes.detect import (
    Block,
    ModelStructure,
    Wiring,
    detect_structure,
    sublayer_counts,
)
from layerfuse.passes.detect.relaxed import RelaxedLinear
from layerfuse.passes.fuse.functions import DOMAIN, function_name, fused_function
from layerfuse.passes.sublayers import check_removable, remove_sublayers
from layerfuse.passes.unfuse import unfuse_residual_norms

_PREFIX = "layerfuse.fused"


def fusion_problem(wiring: Wiring) -> str | None:
    """Why an FFN with this wiring cannot join a fused run (None: it can)."""
    if wiring.residual is None:
        return "; ".join(wiring.notes) or "its residual Add was not found"
    if wiring.output_norm is not None:
        return (
            f"its output is normalized on its own before the residual Add "
            f"({wiring.norm_position} norms), and a norm of each FFN's output is not one wide "
            f"FFN"
        )
    if wiring.norm_position == "post":
        return (
            "FFN fusion needs pre-norm FFNs, this one is post-norm (its norm follows the "
            "residual Add, so the FFNs cannot all read the run's input)"
        )
    if wiring.norm_position != "pre" or wiring.norm is None:
        return "FFN fusion needs pre-norm FFNs, this one has no norm in front of it"
    return None


def _check_run(blocks: list[Block], first: int, last: int, dropped: set[int]) -> None:
    run = blocks[first : last + 1]
    for block in run[1:]:
        if block.attention is not None and block.index not in dropped:
            raise PlanError(
                f"block {block.index} still has attention: blocks {first}-{last} are not a run "
                f"of FFN-only blocks (remove attention first, e.g. --drop-attention)"
            )
    for block in run:
        problem = fusion_problem(block.ff_wiring)
        if problem is not None:
            raise PlanError(f"block {block.index}: cannot fuse its FFN: {problem}")
        if block.ff.neuron_parameters:
            raise PlanError(f"block {block.index}: constants inside the activation are not fused")
        if any(isinstance(lin, RelaxedLinear) for lin in block.ff.linears.values()):
            raise PlanError(
                f"block {block.index}: its FF is a relaxed tie (a per-layer low-rank delta "
                f"beside the shared weights), which one wide FFN would drop; fuse the model "
                f"before merging it, or merge without --relax-rank"
            )
        if block.ff.gated and any(lin.bias is not None for lin in block.ff.linears.values()):
            raise PlanError(f"block {block.index}: gated FFNs with biases are not fused")
    kinds = {(b.ff.kind, b.ff_wiring.norm.kind) for b in run}
    if len(kinds) != 1:
        raise PlanError(f"blocks {first}-{last} mix FFN or norm kinds: {sorted(kinds)}")
    epsilons = {b.ff_wiring.norm.epsilon for b in run}
    if None in epsilons or max(epsilons) - min(epsilons) > 1e-12:
        raise PlanError(f"blocks {first}-{last}: norm epsilons differ or are unknown")
    if run[0].ff.gated and run[0].ff_wiring.norm.bias is not None:
        raise PlanError(f"block {first}: gated FFNs behind a biased norm are not fused")


def _norm_affine(block: Block) -> tuple[np.ndarray, np.ndarray | None]:
    """The FF norm's gain and bias (shift) in float64: fp16/bf16 gains are widened before
    folding, the product is cast to the graph's dtype once, on write."""
    norm = block.ff_wiring.norm
    gain = constant_array(norm.weight)
    gain = np.ones(block.ff.model_dim) if gain is None else gain.reshape(-1).astype(np.float64)
    shift = constant_array(norm.bias)
    return gain, None if shift is None else shift.reshape(-1).astype(np.float64)


def fused_weights(run: list[Block], dtype: np.dtype) -> dict[str, np.ndarray]:
    """W_in (gates then ups, or ups), W_down stacked, biases, norm gains folded in.

    Each projection is read, folded in float64 and written straight into arrays of the
    graph's ``dtype``, one at a time, so memory holds the fused weights once plus one
    projection rather than the whole run widened to float64 (gigabytes for 8B-sized FFs).
    """
    linears = [block.ff.linears for block in run]
    widths = [lin["down"].in_features for lin in linears]
    gated, total = "gate" in linears[0], sum(widths)
    w_in = np.empty((run[0].ff.model_dim, total * (2 if gated else 1)), dtype)
    w_down = np.empty((total, run[0].ff.model_dim), dtype)
    in_biases, down_bias, offset = [], 0.0, 0
    for block, lin, width in zip(run, linears, widths, strict=True):
        gain, shift = _norm_affine(block)
        up_columns = slice(total * gated + offset, total * gated + offset + width)
        up = lin["up"].read_weight().astype(np.float64)
        if not gated:
            bias = lin["up"].read_bias()
            bias = np.zeros(width) if bias is None else bias.astype(np.float64)
            in_biases.append(bias + (shift @ up if shift is not None else 0.0))
        up *= gain[:, None]  # in place: one float64 projection at a time
        w_in[:, up_columns] = up
        del up
        if gated:
            gate = lin["gate"].read_weight().astype(np.float64)
            gate *= gain[:, None]
            w_in[:, offset : offset + width] = gate
            del gate
        w_down[offset : offset + width] = lin["down"].read_weight()
        down = lin["down"].read_bias()
        down_bias = down_bias + (0.0 if down is None else down)
        offset += width
    result = {"w_in": w_in, "w_down": w_down}
    if not gated:
        result["b_in"] = np.concatenate(in_biases)
        result["b_down"] = np.broadcast_to(down_bias, (run[0].ff.model_dim,)).copy()
    return result


def _cast(tape: ir.tape.Tape, value: ir.Value, dtype: ir.DataType, name: str) -> ir.Value:
    """``value`` as ``dtype``: itself when it already is (fp32 graphs get no Casts)."""
    if value.dtype == dtype:
        return value
    cast = tape.op("Cast", [value], {"to": dtype}, name=name)
    cast.dtype = dtype
    return cast


def _shared_norm(tape: ir.tape.Tape, x: ir.Value, block: Block, prefix: str) -> ir.Value:
    """The run's norm without its gain (and bias), computed in float32 whatever the graph's
    dtype: an fp16 square of the residual stream overflows past 256, which is why Hugging
    Face's norms upcast too. The result is cast to the dtype the FFs compute in."""
    norm = block.ff_wiring.norm
    width = block.ff.model_dim
    epsilon = float(norm.epsilon)
    x = _cast(tape, x, ir.DataType.FLOAT, f"{prefix}.norm.upcast")
    if norm.kind == "layer":
        ones = tape.initializer(ir.tensor(np.ones(width, np.float32), name=f"{prefix}.norm.scale"))
        normalized = tape.op(
            "LayerNormalization",
            [x, ones],
            {"axis": -1, "epsilon": epsilon},
            name=f"{prefix}.norm",
        )
    else:
        axes = tape.initializer(ir.tensor(np.array([-1], np.int64), name=f"{prefix}.norm.axes"))
        two = tape.initializer(ir.tensor(np.array(2.0, np.float32), name=f"{prefix}.norm.two"))
        eps = tape.initializer(ir.tensor(np.array(epsilon, np.float32), name=f"{prefix}.norm.eps"))
        square = tape.op("Pow", [x, two], name=f"{prefix}.norm.pow")
        mean = tape.op("ReduceMean", [square, axes], {"keepdims": 1}, name=f"{prefix}.norm.mean")
        shifted = tape.op("Add", [mean, eps], name=f"{prefix}.norm.add")
        root = tape.op("Sqrt", [shifted], name=f"{prefix}.norm.sqrt")
        inverse = tape.op("Reciprocal", [root], name=f"{prefix}.norm.reciprocal")
        normalized = tape.op("Mul", [x, inverse], name=f"{prefix}.norm.mul")
    normalized.dtype = ir.DataType.FLOAT
    compute = block.ff.linears["down"].consumed_dtype()
    return _cast(tape, normalized, compute, f"{prefix}.norm.downcast")


def _fuse_run(model: ir.Model, run: list[Block], first: int, last: int) -> None:
    graph = model.graph
    tape = ir.tape.Tape(graph)
    prefix = f"{_PREFIX}.{first}-{last}"
    kind = run[0].ff.kind
    dtype = run[0].ff.linears["down"].consumed_dtype()
    x = run[0].ff_wiring.norm.input
    if x.dtype is None:
        # No declared type: the stream computes in the FFs' dtype (the norm reads it).
        x.dtype = dtype
    normalized = _shared_norm(tape, x, run[0], prefix)
    weights = fused_weights(run, dtype.numpy())
    inputs = [normalized] + [
        tape.initializer(
            ir.tensor(
                np.ascontiguousarray(weights[name].astype(dtype.numpy(), copy=False)),
                name=f"{prefix}.{name}",
            )
        )
        for name in ("w_in", "w_down", "b_in", "b_down")
        if name in weights
    ]
    fused = tape.op(function_name(kind), inputs, domain=DOMAIN, name=prefix)
    fused.name = f"{prefix}.ffn"
    fused.dtype = dtype
    last_stream = run[-1].ff_wiring.residual.output
    if run[0].ff_wiring.parallel:
        # The first block keeps its attention branch; the fused FFN takes its FF's place.
        fused.type, fused.shape = run[0].ff.output.type, run[0].ff.output.shape
        bypass(run[0].ff.output, fused)
        end = run[0].ff_wiring.residual.output
    else:
        update = _cast(tape, fused, x.dtype, f"{prefix}.ffn.cast")
        end = tape.op("Add", [x, update], name=f"{prefix}.residual")
        end.name = f"{prefix}.out"
        end.type, end.shape = last_stream.type, last_stream.shape
    if end is not last_stream:
        bypass(last_stream, end)
    function = fused_function(kind)
    model.functions.setdefault(function.identifier(), function)


class FuseFeedForwardsPass(PlanPass):
    """Remove a :class:`FusePlan`'s attention sublayers, then fuse each of its runs."""

    def check(self, structure: ModelStructure) -> None:
        check_removable(structure, "attention", self.plan.drop_attention)
        dropped = set(self.plan.drop_attention)
        for first, last in self.plan.fuse:
            _check_run(structure.blocks, first, last, dropped)

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        self._before = sublayer_counts(model)

    def rewrite(self, model: ir.Model) -> bool:
        unfuse_residual_norms(model)
        if self.plan.drop_attention:
            remove_sublayers(model, "attention", self.plan.drop_attention)
        blocks = detect_structure(model).blocks
        for first, last in self.plan.fuse:
            _fuse_run(model, blocks[first : last + 1], first, last)
        if self.plan.fuse:
            model.opset_imports.setdefault(DOMAIN, 1)
            common_passes.RemoveUnusedNodesPass()(model)
            model.graph.sort()
        return bool(self.plan.fuse or self.plan.drop_attention)

    def ensures(self, model: ir.Model) -> None:
        ffs, attentions = sublayer_counts(model)
        before_ffs, before_attentions = self._before
        fused = sum(last - first + 1 for first, last in self.plan.fuse)
        expected = (before_ffs - fused, before_attentions - len(self.plan.drop_attention))
        if (ffs, attentions) != expected:
            raise PlanError(
                f"fusion left {ffs} FF and {attentions} attention sublayers, expected "
                f"{expected[0]} and {expected[1]}"
            )
