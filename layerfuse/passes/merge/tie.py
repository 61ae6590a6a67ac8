"""Apply a merge plan: permute, average and tie the FF sublayers of each window.

Like onnx_ir's ``DeduplicateInitializersPass``, tying is a rewiring of uses: every FF of a
window is pointed at one new set of initializers and the old ones are dropped as unused. The
shared weights are stored in the layout and dtype the MatMul/Gemm reads, so no per-consumer
Transpose or Cast remains to make onnxruntime fold a private copy of a shared weight.

Pre-condition (``requires``): the plan was made for this model, and the FFs of a window have
the same kind, shapes and layouts. Post-condition (``ensures``): every FF of a window reads the
same weight initializers, and none of the FFs' former private weights is left in the model.
"""

from __future__ import annotations

__all__ = [
    "TieFeedForwardsPass",
    "aligned_window_weights",
    "merged_window_weights",
    "tie_weights",
]

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.graph import constant_array, constant_source
from layerfuse.passes.base import PlanPass
from layerfuse.passes.detect import FeedForward, ModelStructure, detect_structure
from layerfuse.passes.detect.relaxed import RelaxedLinear
from layerfuse.passes.ff_weights import (
    FFWeights,
    mean_feedforward,
    read_ff_weights,
    require_modelled,
)
from layerfuse.passes.merge.relax import check_rank, relax_window
from layerfuse.passes.merge.window import MergeWindow

_PREFIX = "layerfuse.tied"


def _signature(ff: FeedForward) -> tuple:
    return (
        ff.kind,
        tuple(
            (
                role,
                lin.in_features,
                lin.out_features,
                lin.node.op_type,
                lin.consumed_transposed,
                lin.consumed_dtype(),
                lin.bias is not None,
                lin.columns,
            )
            for role, lin in ff.linears.items()
        ),
        len(ff.neuron_parameters),
    )


def _window_prefix(window: MergeWindow) -> str:
    return f"{_PREFIX}.{window.blocks[0]}-{window.blocks[-1]}"


def _own_initializers(ff: FeedForward) -> list[ir.Value]:
    """The FF's weight, bias and neuron-constant initializers."""
    values = [lin.weight for lin in ff.linears.values()]
    values += [lin.bias for lin in ff.linears.values() if lin.bias is not None]
    values += list(ff.neuron_parameters)
    return [source for v in values if (source := constant_source(v)) is not None]


def _private_initializers(ff: FeedForward) -> list[str] | None:
    """Names of the FF's initializers if no node outside the FF reads them, else None."""
    inside = set(ff.nodes) | {node for lin in ff.linears.values() for node in lin.weight_path}
    values = _own_initializers(ff)
    if any(use.node not in inside for value in values for use in value.uses()):
        return None
    return [value.name for value in values]


def _permutations(feedforwards: list[FeedForward], window: MergeWindow) -> list[np.ndarray | None]:
    """Each FF's permutation to the anchor's neuron order (None: already in it), checked."""
    permutations = []
    for block, ff in zip(window.blocks, feedforwards, strict=True):
        permutation = window.permutations.get(block)
        width = ff.linears["down"].in_features
        if permutation is not None and sorted(permutation) != list(range(width)):
            raise PlanError(
                f"the permutation for block {block} is not a permutation of {width} neurons"
            )
        permutations.append(None if permutation is None else np.asarray(permutation))
    return permutations


def aligned_window_weights(feedforwards: list[FeedForward], window: MergeWindow) -> list[FFWeights]:
    """Each FF's own weights, permuted to the anchor's neuron order (all of them at once:
    relaxed ties need every layer's own weights beside the shared ones)."""
    return [
        own if permutation is None else own.permuted(permutation)
        for own, permutation in zip(
            map(read_ff_weights, feedforwards), _permutations(feedforwards, window), strict=True
        )
    ]


def merged_window_weights(
    feedforwards: list[FeedForward], window: MergeWindow, refit: dict[str, np.ndarray] | None
) -> FFWeights:
    """The shared weights of ``window``: permuted to the anchor, averaged, maybe refitted."""
    merged = mean_feedforward(feedforwards, _permutations(feedforwards, window))
    if refit:
        merged.matrices["down"] = refit["down"].astype(np.float32)
        if "down_bias" in refit:
            merged.biases["down"] = refit["down_bias"].astype(np.float32)
    return merged


def tie_weights(
    graph: ir.Graph, feedforwards: list[FeedForward], weights: FFWeights, prefix: str
) -> None:
    """Point every FF in ``feedforwards`` at new initializers holding ``weights``.

    With one FF this simply replaces its weights (used to permute a single FF). The parts of
    a fused projection (Phi-3's gate and up halves) are written back as one initializer, each
    part's (permuted) columns in the range it occupies.
    """
    tape = ir.tape.Tape(graph)
    template = feedforwards[0]
    by_node: dict[ir.Node, list[str]] = {}
    for role, linear in sorted(template.linears.items(), key=lambda item: item[1].columns or ()):
        by_node.setdefault(linear.node, []).append(role)
    for roles in by_node.values():
        linear, name = template.linears[roles[0]], "+".join(roles)
        joined = np.concatenate([weights.matrices[role] for role in roles], axis=1)
        weight = tape.initializer(linear.consumed_weight_tensor(joined, f"{prefix}.{name}.weight"))
        bias = None
        if linear.bias is not None:
            joined = np.concatenate([weights.biases[role] for role in roles])
            bias = tape.initializer(linear.bias_tensor(joined, f"{prefix}.{name}.bias"))
        for ff in feedforwards:
            member = ff.linears[roles[0]]
            member.node.replace_input_with(1, weight)
            if bias is not None:
                node, slot = member.bias_input_index()
                node.replace_input_with(slot, bias)
    for position, template_value in enumerate(template.neuron_parameters):
        original = constant_array(template_value)
        shared = tape.initializer(
            ir.tensor(
                weights.neuron_parameters[position].reshape(original.shape).astype(original.dtype),
                name=f"{prefix}.neuron{position}",
            )
        )
        for ff in feedforwards:
            for use in list(ff.neuron_parameters[position].uses()):
                use.node.replace_input_with(use.idx, shared)


class TieFeedForwardsPass(PlanPass):
    """Rewrite a model so that each window of the plan reads one shared set of FF weights."""

    def check(self, structure: ModelStructure) -> None:
        blocks = structure.blocks
        if self.plan.relax_rank and self.plan.refit_weights:
            raise PlanError("a refitted plan cannot be relaxed: the refit models the plain tie")
        self._replaced: list[str] = []
        for window in self.plan.windows:
            feedforwards = [blocks[i].ff for i in window.blocks]
            if len({_signature(ff) for ff in feedforwards}) != 1:
                raise PlanError(
                    f"FFs of blocks {window.blocks[0]}-{window.blocks[-1]} differ in kind, shape "
                    f"or layout and cannot share weights"
                )
            if any(
                isinstance(lin, RelaxedLinear) for ff in feedforwards for lin in ff.linears.values()
            ):
                # The tie would replace the shared weights and leave each layer's old delta on top.
                raise PlanError(
                    f"FFs of blocks {window.blocks[0]}-{window.blocks[-1]} are already relaxed; "
                    "merge the model they were merged from instead"
                )
            if self.plan.refit_weights:
                require_modelled(feedforwards, "refit")
            if self.plan.relax_rank:
                check_rank(feedforwards[0], self.plan.relax_rank, f"block {window.blocks[0]}")
            for ff in feedforwards:
                self._replaced += _private_initializers(ff) or []

    def rewrite(self, model: ir.Model) -> bool:
        blocks = detect_structure(model).blocks
        for index, window in enumerate(self.plan.windows):
            feedforwards = [blocks[i].ff for i in window.blocks]
            rank, init = self.plan.relax_rank, self.plan.relax_init
            aligned = aligned_window_weights(feedforwards, window) if rank else []
            merged = merged_window_weights(feedforwards, window, self.plan.refit_weights.get(index))
            tie_weights(model.graph, feedforwards, merged, _window_prefix(window))
            if rank:
                relax_window(
                    model.graph, window, feedforwards, aligned, merged, rank=rank, init=init
                )
        common_passes.RemoveUnusedNodesPass()(model)
        return bool(self.plan.windows)

    def ensures(self, model: ir.Model) -> None:
        blocks = detect_structure(model).blocks
        for window in self.plan.windows:
            for role in blocks[window.blocks[0]].ff.linears:
                members = [blocks[i].ff.linears[role] for i in window.blocks]
                if len({id(linear.consumed_weight) for linear in members}) != 1:
                    raise PlanError(f"blocks {window.blocks} do not share their {role} weight")
                ranks = {getattr(linear, "relax_rank", 0) for linear in members}
                if ranks != {self.plan.relax_rank}:
                    raise PlanError(
                        f"blocks {window.blocks} lack their {role} deltas of rank "
                        f"{self.plan.relax_rank}"
                    )
        left = [name for name in self._replaced if name in model.graph.initializers]
        if left:
            raise PlanError(f"tying left the replaced FF weight {left[0]} in the model")
