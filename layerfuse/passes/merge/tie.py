"""Apply a merge plan: permute, average and tie the FF sublayers of each window.

Like onnx_ir's ``DeduplicateInitializersPass``, tying is a rewiring of uses: every FF of a
window is pointed at one new set of initializers and the old ones are dropped as unused. The
shared weights are stored in the layout and dtype the MatMul/Gemm reads, so no per-consumer
Transpose or Cast remains to make onnxruntime fold a private copy of a shared weight.

Pre-condition (``requires``): the plan was made for this model, and the FFs of a window have
the same kind, shapes and layouts. Post-condition (``ensures``): every FF of a window reads the
same weight values.
"""

from __future__ import annotations

__all__ = ["TieFeedForwardsPass", "merged_window_weights", "tie_weights"]

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.graph import constant_array
from layerfuse.passes.detect import FeedForward, detect_structure
from layerfuse.passes.merge.ff_weights import FFWeights, average, read_ff_weights
from layerfuse.passes.merge.plan import MergePlan, MergeWindow
from layerfuse.passes.plan_io import check_plan_fits

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
            )
            for role, lin in ff.linears.items()
        ),
        len(ff.neuron_parameters),
    )


def merged_window_weights(
    feedforwards: list[FeedForward], window: MergeWindow, refit: dict[str, np.ndarray] | None
) -> FFWeights:
    """The shared weights of ``window``: permuted to the anchor, averaged, maybe refitted."""
    weights = []
    for block, ff in zip(window.blocks, feedforwards, strict=True):
        own = read_ff_weights(ff)
        permutation = window.permutations.get(block)
        if permutation is not None:
            if sorted(permutation) != list(range(own.width)):
                raise PlanError(
                    f"the permutation for block {block} is not a permutation of {own.width} neurons"
                )
            own = own.permuted(np.asarray(permutation))
        weights.append(own)
    merged = average(weights)
    if refit:
        merged.matrices["down"] = refit["down"].astype(np.float32)
        if "down_bias" in refit:
            merged.biases["down"] = refit["down_bias"].astype(np.float32)
    return merged


def _register(graph: ir.Graph, tensor: ir.Tensor) -> ir.Value:
    value = ir.Value(
        name=tensor.name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor
    )
    graph.register_initializer(value)
    return value


def tie_weights(
    graph: ir.Graph, feedforwards: list[FeedForward], weights: FFWeights, prefix: str
) -> None:
    """Point every FF in ``feedforwards`` at new initializers holding ``weights``.

    With one FF this simply replaces its weights (used to permute a single FF).
    """
    template = feedforwards[0]
    for role, linear in template.linears.items():
        weight = _register(
            graph, linear.consumed_weight_tensor(weights.matrices[role], f"{prefix}.{role}.weight")
        )
        bias = None
        if linear.bias is not None:
            bias = _register(
                graph, linear.bias_tensor(weights.biases[role], f"{prefix}.{role}.bias")
            )
        for ff in feedforwards:
            member = ff.linears[role]
            member.node.replace_input_with(1, weight)
            if bias is not None:
                node, slot = member.bias_input_index()
                node.replace_input_with(slot, bias)
    for position, template_value in enumerate(template.neuron_parameters):
        original = constant_array(template_value)
        shared = _register(
            graph,
            ir.tensor(
                weights.neuron_parameters[position].reshape(original.shape).astype(original.dtype),
                name=f"{prefix}.neuron{position}",
            ),
        )
        for ff in feedforwards:
            for use in list(ff.neuron_parameters[position].uses()):
                use.node.replace_input_with(use.idx, shared)


class TieFeedForwardsPass(ir.passes.InPlacePass):
    """Rewrite a model so that each window of the plan reads one shared set of FF weights."""

    def __init__(self, plan: MergePlan) -> None:
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        blocks = check_plan_fits(model, self.plan.fingerprint, self.plan.num_blocks)
        for window in self.plan.windows:
            signatures = {_signature(blocks[i].ff) for i in window.blocks}
            if len(signatures) != 1:
                raise PlanError(
                    f"FFs of blocks {window.blocks[0]}-{window.blocks[-1]} differ in kind, shape "
                    f"or layout and cannot share weights"
                )
            if self.plan.refit_weights and any(
                blocks[i].ff.neuron_parameters for i in window.blocks
            ):
                raise PlanError(
                    "refit is not supported for FFs with constants inside the activation"
                )

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        blocks = detect_structure(model).blocks
        for index, window in enumerate(self.plan.windows):
            feedforwards = [blocks[i].ff for i in window.blocks]
            merged = merged_window_weights(feedforwards, window, self.plan.refit_weights.get(index))
            tie_weights(
                graph, feedforwards, merged, f"{_PREFIX}.{window.blocks[0]}-{window.blocks[-1]}"
            )
        common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.plan.windows))

    def ensures(self, model: ir.Model) -> None:
        blocks = detect_structure(model).blocks
        for window in self.plan.windows:
            for role in blocks[window.blocks[0]].ff.linears:
                readers = {id(blocks[i].ff.linears[role].consumed_weight) for i in window.blocks}
                if len(readers) != 1:
                    raise PlanError(f"blocks {window.blocks} do not share their {role} weight")
