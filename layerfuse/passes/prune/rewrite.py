"""Drop whole blocks or single sublayers; the residual stream passes through.

Removing a sublayer makes the readers of its residual Add read the Add's other operand, so
``h + f(h)`` becomes ``h`` (in post-norm models the norm after the Add stays: ``LN(h)``).
Removing a whole block makes the readers of the block's output stream read its input stream
(in post-norm models that skips both norms too). Blocks are bypassed from the last to the
first so that consecutive removals chain. Dead nodes and initializers are then removed.
"""

from __future__ import annotations

__all__ = ["PruneSublayersPass"]

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.graph import bypass
from layerfuse.passes.detect import Block, Sublayer, detect_structure
from layerfuse.passes.plan_io import check_plan_fits
from layerfuse.passes.prune.plan import PrunePlan


def _drop_sublayer(wiring: Sublayer | None, what: str, block: int) -> None:
    if wiring is None or wiring.residual is None:
        raise PlanError(f"block {block} has no {what} sublayer with a residual Add to remove")
    bypass(wiring.residual.output, wiring.residual.operand)


def _drop_block(block: Block) -> None:
    stream_in, stream_out = block.stream_in, block.stream_out
    if stream_in is None or stream_out is None:
        raise PlanError(f"block {block.index}: cannot trace its residual stream to remove it")
    bypass(stream_out, stream_in)


class PruneSublayersPass(ir.passes.InPlacePass):
    def __init__(self, plan: PrunePlan) -> None:
        super().__init__()
        self.plan = plan

    def requires(self, model: ir.Model) -> None:
        blocks = check_plan_fits(model, self.plan.fingerprint, self.plan.num_blocks)
        for index in self.plan.blocks:
            wirings = [blocks[index].ff_wiring, blocks[index].attention_wiring]
            if any(
                w is not None and w.residual is not None and w.residual.node.op_type != "Add"
                for w in wirings
            ):
                raise PlanError(
                    f"block {index}: its residual Add is fused into "
                    f"{blocks[index].ff_wiring.residual.node.op_type}; prune the graph before "
                    f"onnxruntime's optimizer fuses it"
                )
        if self.plan.target == "attention":
            missing = [b for b in self.plan.blocks if blocks[b].attention is None]
            if missing:
                raise PlanError(f"block {missing[0]} has no attention sublayer to remove")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = detect_structure(model).blocks
        # Last block first: a bypass re-points the readers of a block's output at its input,
        # which is the previous block's output; that one must still have its readers then.
        for index in sorted(self.plan.blocks, reverse=True):
            block = blocks[index]
            if self.plan.target == "block":
                _drop_block(block)
            elif self.plan.target == "ff":
                _drop_sublayer(block.ff_wiring, "FF", index)
            else:
                _drop_sublayer(block.attention_wiring, "attention", index)
        common_passes.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=True)
