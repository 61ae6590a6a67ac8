"""Where local reconstruction works: the tied FF sets a merge created, found by detection.

A merge makes the FFs of consecutive blocks read one shared set of initializers. Detection
on the optimized graph gives each block's FF linears and the initializer each reads
(``linear.weight``, the start of any Transpose/Cast chain), so blocks that read a common FF
initializer form one tied set, whatever the family or exporter named things. A set counts
as a rewrite (and is reconstructed) only when some member reads other FF initializers than
its block in the original: a model that shares weights by design (ALBERT) is left alone.

Blocks of the two graphs are matched by the name of their FF down-projection node, as in
:mod:`layerfuse.recover.mapping`; the original block gives the tensors to tap (its FF input,
after the pre-FF norm, and its down-projection output, before the residual Add), the
optimized block the region of the student graph to fit.
"""

from __future__ import annotations

__all__ = ["TiedSet", "find_tied_sets"]

from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.passes.detect import Block, detect_structure
from layerfuse.recover.graph_module import GraphModule


@dataclass
class TiedSet:
    """One shared FF and, per member block (original index), where its data comes from."""

    blocks: list[int]
    # Original graph: (FF input, FF output) of each member, tapped in onnxruntime.
    targets: list[tuple[str, str]]
    # Optimized graph: (FF input, FF output) of each member, run in torch.
    regions: list[tuple[str, str]]

    def weights(self, student: GraphModule) -> list[str]:
        """The student parameters the members' FF regions read (the shared initializers)."""
        names: dict[str, None] = {}
        for inputs, output in self.regions:
            names.update(dict.fromkeys(student.region_weights([inputs], [output])))
        return list(names)


def _ff_weights(block: Block) -> set[str]:
    return {linear.weight.name for linear in block.ff.linears.values()}


def _groups(blocks: list[Block]) -> list[list[Block]]:
    """Blocks joined when their FFs read a common initializer (transitively), in order."""
    groups: list[tuple[set[str], list[Block]]] = []
    for block in blocks:
        names, members = set(_ff_weights(block)), [block]
        for group in [g for g in groups if g[0] & names]:
            groups.remove(group)
            names |= group[0]
            members = group[1] + members
        groups.append((names, members))
    return [sorted(members, key=lambda b: b.index) for _, members in groups if len(members) > 1]


def find_tied_sets(original: ir.Model, optimized: ir.Model) -> list[TiedSet]:
    """The tied FF sets of ``optimized`` that the rewrite made, in block order."""
    teacher = {b.ff.down.node.name: b for b in detect_structure(original).blocks}
    sets = []
    for members in _groups(detect_structure(optimized).blocks):
        matched = [(teacher.get(b.ff.down.node.name), b) for b in members]
        if any(source is None for source, _ in matched):
            continue
        if all(_ff_weights(source) == _ff_weights(b) for source, b in matched):
            continue
        sets.append(
            TiedSet(
                blocks=[source.index for source, _ in matched],
                targets=[(s.ff.input.name, s.ff.output.name) for s, _ in matched],
                regions=[(b.ff.input.name, b.ff.output.name) for _, b in matched],
            )
        )
    return sets
