"""Relaxed ties (Bae et al. 2024, *Relaxed Recursive Transformers*): per-layer low-rank deltas.

A tie makes every FF of a window compute one function; a relaxed tie gives each layer back a
little of its own at ``R * (in + out)`` parameters per projection. Each shared MatMul/Gemm
keeps reading the one shared initializer (so ``quantize`` and recovery still see one tied
set), and beside it the layer computes ``(x @ A_i) @ B_i`` with its own ``A_i [in, R]`` and
``B_i [R, out]``, added by an Add to the output of the projection's node, before the
activation: before a separate bias Add (so the bias Add and what onnxruntime fuses it with,
``BiasGelu``, ``SkipLayerNormalization``, stay as in the plain tie and a zero delta is exact
bit for bit), after a Gemm's built-in bias. The factors are stored in the dtype the
projection multiplies in, so no Cast stands in the way.

Initialisation (``relax_init``):

- ``svd``: ``A_i B_i`` is the SVD of ``W_i - W_shared`` truncated to rank ``R``, the best
  rank-``R`` correction of the layer toward its own (aligned) weights (Eckart-Young), computed
  from the weights alone; at full rank it restores the layer's original matrices. The
  singular values are split evenly (``U sqrt(S)``, ``sqrt(S) V^T``) so both factors start at
  the same scale for training.
- ``zero``: ``B_i = 0`` and a small seeded random ``A_i``: the delta is exactly zero, so the
  graph computes what the plain tie computes, bit for bit, while ``B_i``'s gradient is not.

Biases and per-neuron constants stay shared (the average): a delta on ``x`` cannot express
a constant offset.
"""

from __future__ import annotations

__all__ = ["delta_factors", "delta_parameters", "projection_groups", "relax_window"]

import zlib

import numpy as np
import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.passes.detect import FeedForward
from layerfuse.passes.ff_weights import FFWeights
from layerfuse.passes.linears import Linear
from layerfuse.passes.merge.window import MergeWindow

_PREFIX = "layerfuse.relax"


def projection_groups(ff: FeedForward) -> dict[ir.Node, list[str]]:
    """The roles each projection node computes, in column order (a fused gate+up is one)."""
    groups: dict[ir.Node, list[str]] = {}
    for role, linear in sorted(ff.linears.items(), key=lambda item: item[1].columns or ()):
        groups.setdefault(linear.node, []).append(role)
    return groups


def delta_parameters(ff: FeedForward, rank: int) -> int:
    """Parameters the rank-``rank`` deltas add to one layer of a relaxed tie."""
    nodes = [ff.linears[roles[0]] for roles in projection_groups(ff).values()]
    return sum(rank * (lin.in_features + lin.stored_out_features) for lin in nodes)


def check_rank(ff: FeedForward, rank: int, where: str) -> None:
    """Refuse a rank no projection of ``ff`` can hold (more than ``min(in, out)``)."""
    for roles in projection_groups(ff).values():
        linear = ff.linears[roles[0]]
        limit = min(linear.in_features, linear.stored_out_features)
        if rank > limit:
            raise PlanError(
                f"relax rank {rank} is larger than the {'+'.join(roles)} projection of "
                f"{where} allows (min of {linear.in_features} inputs and "
                f"{linear.stored_out_features} outputs: {limit})"
            )


def delta_factors(
    original: np.ndarray, shared: np.ndarray, rank: int, init: str, seed: str
) -> tuple[np.ndarray, np.ndarray]:
    """``A [in, rank]`` and ``B [rank, out]`` for a layer whose own weight is ``original``."""
    if init == "svd":
        u, s, vt = np.linalg.svd(original.astype(np.float64) - shared, full_matrices=False)
        root = np.sqrt(s[:rank])
        return u[:, :rank] * root, root[:, None] * vt[:rank]
    rng = np.random.default_rng(zlib.crc32(seed.encode()))
    rows = original.shape[0]
    return rng.normal(0.0, 1.0 / np.sqrt(rows), (rows, rank)), np.zeros((rank, shared.shape[1]))


def _add_delta(graph: ir.Graph, linear: Linear, a: np.ndarray, b: np.ndarray, name: str) -> None:
    """Sum ``(x @ a) @ b`` onto the output of ``linear``'s node for every reader of it."""
    output = linear.node.outputs[0]
    if output.is_graph_output():
        raise PlanError(f"cannot relax {linear.node.name}: its output is a graph output")
    dtype = linear.consumed_dtype().numpy()
    tape = ir.tape.Tape(graph)
    a_value = tape.initializer(ir.tensor(np.ascontiguousarray(a.astype(dtype)), name=f"{name}.A"))
    b_value = tape.initializer(ir.tensor(np.ascontiguousarray(b.astype(dtype)), name=f"{name}.B"))
    low = ir.Value(name=f"{name}.xA", type=output.type)
    delta = ir.Value(name=f"{name}.xAB", type=output.type, shape=output.shape)
    summed = ir.Value(name=f"{name}.sum", type=output.type, shape=output.shape)
    uses = list(output.uses())
    nodes = [
        ir.node("MatMul", [linear.input, a_value], outputs=[low], name=f"{name}.A.MatMul"),
        ir.node("MatMul", [low, b_value], outputs=[delta], name=f"{name}.B.MatMul"),
        ir.node("Add", [output, delta], outputs=[summed], name=f"{name}.Add"),
    ]
    for use in uses:
        use.node.replace_input_with(use.idx, summed)
    graph.insert_after(linear.node, nodes)


def relax_window(
    graph: ir.Graph,
    window: MergeWindow,
    feedforwards: list[FeedForward],
    aligned: list[FFWeights],
    shared: FFWeights,
    *,
    rank: int,
    init: str,
) -> None:
    """Give every FF of a tied window its own rank-``rank`` delta on each projection, named
    ``layerfuse.relax.<first>-<last>.<block>.<roles>.A/B``.

    ``aligned`` holds each FF's original weights permuted to the shared neuron order, so the
    delta corrects toward the same function the layer computed before the tie.
    """
    span = f"{_PREFIX}.{window.blocks[0]}-{window.blocks[-1]}"
    for block, ff, own in zip(window.blocks, feedforwards, aligned, strict=True):
        for roles in projection_groups(ff).values():
            original = np.concatenate([own.matrices[role] for role in roles], axis=1)
            target = np.concatenate([shared.matrices[role] for role in roles], axis=1)
            name = f"{span}.{block}.{'+'.join(roles)}"
            a, b = delta_factors(original, target, rank, init, name)
            _add_delta(graph, ff.linears[roles[0]], a, b, name)
