"""Which blocks of the optimized graph are which blocks of the original, and what changed.

Rewrites keep node and value names of what they do not touch, so blocks are matched by the
name of their FF down-projection node, found by detection in both graphs (no name patterns).
From that match, without needing the plan:

- *modified* original blocks: FF gone (pruned, or fused into one wide FFN), FF reading
  weights the original does not have (merged, permuted, refitted), or attention removed;
  a ``--plan`` adds the blocks it names;
- *touched* = modified blocks and their immediate neighbours (index +-1 in the original);
  ``--train touched`` trains the FF, attention and norm parameters of the touched blocks
  that still exist, plus every parameter the rewrite created (tied, fused weights);
- *hidden pairs* for ``kd+hidden``: the residual stream after each surviving block, which
  keeps its name, paired with the same tensor of the original; a fused run's output (the
  Add behind a ``layerfuse`` function node) is paired with the original stream entering the
  next surviving block.
"""

from __future__ import annotations

__all__ = ["BlockMap", "map_blocks"]

from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.model.graph import constant_source, consumers
from layerfuse.passes.detect import Block, detect_structure
from layerfuse.passes.fuse.functions import DOMAIN as FUSED_DOMAIN
from layerfuse.passes.plan import Plan


@dataclass
class BlockMap:
    modified: list[int]
    touched: list[int]
    hidden_pairs: list[tuple[str, str]]
    # Parameters of the touched blocks' sublayers, and initializers the rewrite created.
    touched_initializers: set[str]


def _plan_blocks(plan: Plan | None) -> set[int]:
    if plan is None:
        return set()
    blocks: set[int] = set()
    for window in getattr(plan, "windows", []):
        blocks.update(window.blocks)
    blocks.update(getattr(plan, "blocks", []))
    blocks.update(getattr(plan, "drop_attention", []))
    for first, last in getattr(plan, "fuse", []):
        blocks.update(range(first, last + 1))
    return blocks


def _block_initializers(block: Block) -> set[str]:
    """Names of the initializers of a block's FF, attention and norms."""
    values = []
    linears = list(block.ff.linears.values())
    if block.attention is not None:
        linears += [*block.attention.projections, block.attention.output_projection]
    for linear in linears:
        values += [linear.weight, linear.bias]
    for wiring in (block.ff_wiring, block.attention_wiring):
        for norm in (wiring.norm, wiring.post_norm) if wiring is not None else ():
            if norm is not None:
                values += [norm.weight, norm.bias]
    sources = (constant_source(v) for v in values if v is not None)
    return {s.name for s in sources if s is not None and s.is_initializer()}


def _attention_node(block: Block) -> str | None:
    return None if block.attention is None else block.attention.output_projection.node.name


def _fused_pairs(
    optimized: ir.Model, teacher: list[Block], matched: dict[str, int], student: list[Block]
) -> list[tuple[str, str]]:
    """(fused run output, original stream at the same place) for each fused node."""
    enters = {}
    for block in student:
        original = matched.get(block.ff.down.node.name)
        if block.stream_in is not None and original is not None:
            enters[block.stream_in.name] = original
    pairs = []
    for node in optimized.graph:
        if node.domain != FUSED_DOMAIN:
            continue
        for reader in consumers(node.outputs[0]):
            out = reader.outputs[0].name
            following = enters.get(out)
            if reader.op_type == "Add" and following is not None and following > 0:
                stream = teacher[following - 1].stream_out
                if stream is not None:
                    pairs.append((out, stream.name))
    return pairs


def map_blocks(original: ir.Model, optimized: ir.Model, plan: Plan | None = None) -> BlockMap:
    teacher = detect_structure(original).blocks
    student = detect_structure(optimized).blocks
    by_down = {block.ff.down.node.name: block.index for block in teacher}
    matched = {
        b.ff.down.node.name: by_down[b.ff.down.node.name]
        for b in student
        if b.ff.down.node.name in by_down
    }
    known = set(original.graph.initializers)
    created = set(optimized.graph.initializers) - known
    modified = set(range(len(teacher))) - set(matched.values())
    pairs = []
    for block in student:
        index = matched.get(block.ff.down.node.name)
        if index is None:
            continue
        if _block_initializers(block) & created or (
            _attention_node(teacher[index]) is not None
            and _attention_node(teacher[index]) != _attention_node(block)
        ):
            modified.add(index)
        stream, original_stream = block.stream_out, teacher[index].stream_out
        if (
            stream is not None
            and original_stream is not None
            and stream.name == original_stream.name
        ):
            pairs.append((stream.name, stream.name))
    pairs += _fused_pairs(optimized, teacher, matched, student)
    modified |= _plan_blocks(plan)
    touched = sorted({n for i in modified for n in (i - 1, i, i + 1) if 0 <= n < len(teacher)})
    names = set(created)
    for block in student:
        if matched.get(block.ff.down.node.name) in touched:
            names |= _block_initializers(block)
    return BlockMap(sorted(modified), touched, pairs, names)
