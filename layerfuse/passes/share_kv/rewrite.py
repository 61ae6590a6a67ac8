"""The share-kv rewrite: a layer's attention reads another layer's full keys and values.

For each (target, source) pair and each of keys and values, every reader of the target's
full tensor (its past with this step's tokens appended) reads the source's instead. The
target's present output and past input leave the graph's signature (what still read the
past, its length for positions and masks, reads the source's past, of the same length), and
what computed its new keys and values (the projections, the rotary embedding, the append) is
removed as dead code, initializers included. Geometry (heads, head size, dtype) must match:
the attention that reads the source's tensor was built for the target's shape.
"""

from __future__ import annotations

__all__ = ["ShareKVPass"]

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.errors import PlanError
from layerfuse.model.cache import CacheEntry
from layerfuse.passes.base import PlanPass
from layerfuse.passes.detect import ModelStructure, detect_structure
from layerfuse.passes.share_kv.fold import fold_alignment
from layerfuse.passes.share_kv.layers import KVLayer, kv_layers


def _geometry(entry: CacheEntry) -> tuple:
    return entry.heads, entry.head_dim, entry.dtype


def _check_pair(target: KVLayer, source: KVLayer) -> None:
    if target.fused or source.fused:
        raise PlanError(
            f"layers {target.index}<-{source.index}: a fused attention op "
            f"({target.key.consumer.op_type}) appends this step's keys to its own past "
            f"inside the op, so another layer's cache cannot be fed to it; share KV on the "
            f"'layerfuse export --kv-cache' graph of the model instead"
        )
    for role, mine, theirs in (
        ("keys", target.key, source.key),
        ("values", target.value, source.value),
    ):
        if _geometry(mine) != _geometry(theirs):
            raise PlanError(
                f"layers {target.index}<-{source.index}: their {role} differ in heads, "
                f"head size or dtype ({_geometry(mine)} vs {_geometry(theirs)})"
            )


def _share(graph: ir.Graph, mine: CacheEntry, theirs: CacheEntry) -> None:
    """Readers of ``mine``'s full tensor read ``theirs``; ``mine`` leaves the signature."""
    if mine.present is not None:
        graph.outputs.remove(mine.present)
    ir.convenience.replace_all_uses_with(mine.consumer.outputs[0], theirs.consumer.outputs[0])


class ShareKVPass(PlanPass):
    """Apply a :class:`~layerfuse.passes.share_kv.plan.ShareKVPlan` in place."""

    def check(self, structure: ModelStructure) -> None:
        del structure  # the cache, not the blocks, decides what can be shared

    def requires(self, model: ir.Model) -> None:
        super().requires(model)
        layers = kv_layers(model)
        if len(layers) != self.plan.num_kv_layers:
            raise PlanError(
                f"the plan expects {self.plan.num_kv_layers} layers with a KV cache, "
                f"found {len(layers)}"
            )
        for target, source in self.plan.pairs:
            _check_pair(layers[target], layers[source])
        if self.plan.alignments and set(self.plan.alignments) != set(self.plan.pairs):
            raise PlanError("the share-kv plan's alignment maps do not cover its pairs")

    def rewrite(self, model: ir.Model) -> bool:
        layers = kv_layers(model)
        graph = model.graph
        if self.plan.alignments:
            structure = detect_structure(model)
            for (target, _), alignment in self.plan.alignments.items():
                fold_alignment(graph, structure, layers[target], alignment)
        for target, source in self.plan.pairs:
            for mine, theirs in zip(layers[target].entries, layers[source].entries, strict=True):
                _share(graph, mine, theirs)
        common_passes.RemoveUnusedNodesPass()(model)
        for target, source in self.plan.pairs:
            for mine, theirs in zip(layers[target].entries, layers[source].entries, strict=True):
                # What still reads the target's past asks for its length (exporters compute
                # positions and masks from it), which the source's past has too.
                ir.convenience.replace_all_uses_with(mine.past, theirs.past)
                graph.inputs.remove(mine.past)
        return True

    def ensures(self, model: ir.Model) -> None:
        remaining = len(kv_layers(model))
        expected = self.plan.num_kv_layers - len(self.plan.pairs)
        if remaining != expected:
            raise PlanError(f"share-kv left {remaining} cached layers, expected {expected}")
