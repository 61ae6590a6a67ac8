"""Removing whole blocks or single sublayers: the residual stream passes through.

Shared by pruning and FFN Fusion (which removes attention before fusing FFs).

Removing a sublayer makes the readers of its residual Add read the Add's other operand, so
``h + f(h)`` becomes ``h`` (in post-norm models the norm after the Add stays: ``LN(h)``; an
output norm between the sublayer and the Add goes with it, as in Gemma-2's sandwich). In a
parallel block (``x + attn(ln(x)) + ff(ln(x))``) the Add joining the two branches is bypassed
instead, so removing the FF leaves ``x + attn(ln(x))``; removing the block removes both.
Removing a whole block makes the readers of the block's output stream read its input stream
(in post-norm models that skips both norms too). Blocks are bypassed from the last to the
first so that consecutive removals chain. Dead nodes and initializers are then removed.

Residual Adds fused into ``Skip*Norm`` nodes (onnxruntime's optimizer, onnxruntime-genai's
builder) are split back into Add + norm first (:mod:`layerfuse.passes.unfuse`). Removing an
attention sublayer also removes its KV-cache inputs and outputs in decoder graphs
(:mod:`layerfuse.passes.kv_cache`).
"""

from __future__ import annotations

__all__ = ["check_removable", "remove_sublayers"]

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.graph import bypass
from layerfuse.passes.detect import ModelStructure, Wiring, detect_structure
from layerfuse.passes.kv_cache import remove_attention_cache
from layerfuse.passes.unfuse import unfuse_residual_norms


def _residual_add(wiring: Wiring | None, what: str, block: int):
    """The residual Add to bypass, or a one-line reason why there is none."""
    if wiring is None or wiring.residual is None:
        why = "; ".join(wiring.notes) if wiring is not None and wiring.notes else "not traced"
        raise PlanError(f"block {block}: cannot remove its {what} sublayer: {why}")
    return wiring.residual


def check_removable(structure: ModelStructure, target: str, indices: list[int]) -> None:
    """Raise a one-line :class:`PlanError` if any of ``target`` at ``indices`` cannot go."""
    for index in indices:
        block = structure.blocks[index]
        if target in ("block", "attention"):
            if block.attention is None and target == "attention":
                raise PlanError(f"block {index} has no attention sublayer to remove")
            if block.attention is not None:
                _residual_add(block.attention_wiring, "attention", index)
        if target in ("block", "ff"):
            _residual_add(block.ff_wiring, "FF", index)
        if target == "block" and (block.stream_in is None or block.stream_out is None):
            raise PlanError(f"block {index}: cannot trace its residual stream to remove it")


def remove_sublayers(model: ir.Model, target: str, indices: list[int]) -> None:
    """Bypass ``target`` (block, ff or attention) at ``indices`` and drop what is left dead."""
    unfuse_residual_norms(model)
    blocks = detect_structure(model).blocks
    # Last block first: a bypass re-points the readers of a block's output at its input,
    # which is the previous block's output; that one must still have its readers then.
    for index in sorted(indices, reverse=True):
        block = blocks[index]
        if target == "block":
            bypass(block.stream_out, block.stream_in)
        else:
            wiring = block.ff_wiring if target == "ff" else block.attention_wiring
            # A parallel block keeps its sibling: the branch Add, not the residual, goes.
            bypass(wiring.removal.output, wiring.removal.operand)
    if target != "ff":
        remove_attention_cache(model, [blocks[i].attention for i in indices if blocks[i].attention])
    common_passes.RemoveUnusedNodesPass()(model)
