"""Assemble detected sublayers into transformer blocks: the map every pass works from.

A block is one FF sublayer plus the attention sublayer that precedes it on the residual
stream, each with its norms and residual Add (:mod:`~layerfuse.passes.detect.wiring`:
pre-, post-, sandwich and output norms, parallel blocks). An attention belongs to the FF
whose residual Add it shares (parallel blocks) or whose stream it writes (the FF's residual
operand is the attention's output stream); graph order decides only where wiring could not
be traced. Why a candidate was not taken is kept (``rejected``, ``notes``) for
``layerfuse inspect --explain`` and for the one-line errors of passes that need a wiring.

:meth:`ModelStructure.to_json` is the stable schema ``layerfuse inspect --json`` prints and
plans refer to (by node and initializer names, which survive a save/load round trip).
"""

from __future__ import annotations

__all__ = ["SCHEMA", "Block", "ModelStructure", "Wiring", "detect_structure", "sublayer_counts"]

from dataclasses import dataclass, field

import onnx_ir as ir

from layerfuse.errors import DetectionError
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.graph import node_index
from layerfuse.model.io import parameter_count, weight_bytes
from layerfuse.passes.detect.attention import Attention, find_attentions, scan_attentions
from layerfuse.passes.detect.feedforward import (
    FeedForward,
    find_feedforwards,
    scan_feedforwards,
)
from layerfuse.passes.detect.norms import same_tensor
from layerfuse.passes.detect.relaxed import RelaxedLinear
from layerfuse.passes.detect.result import Rejection, describe
from layerfuse.passes.detect.wiring import Wiring, find_wiring
from layerfuse.passes.quantized import refuse_quantized_linears

SCHEMA = "layerfuse.structure/2"


def _relax_ranks(ff: FeedForward) -> dict:
    """``{"relax_rank": {role: R}}`` for the relaxed projections of ``ff`` (a relaxed tie's
    per-layer deltas), nothing for a plain FF so that its JSON is what it always was."""
    ranks = {r: lin.relax_rank for r, lin in ff.linears.items() if isinstance(lin, RelaxedLinear)}
    return {"relax_rank": ranks} if ranks else {}


@dataclass
class Block:
    index: int
    ff: FeedForward
    ff_wiring: Wiring
    attention: Attention | None
    attention_wiring: Wiring | None
    module: str | None
    notes: tuple[str, ...] = ()

    @property
    def stream_in(self) -> ir.Value | None:
        """The residual stream entering the block (None when it cannot be traced)."""
        wiring = self.attention_wiring if self.attention is not None else self.ff_wiring
        if wiring is None or wiring.residual is None:
            return None
        return wiring.residual.operand

    @property
    def stream_out(self) -> ir.Value | None:
        """The residual stream leaving the block."""
        return self.ff_wiring.stream_out

    def to_json(self) -> dict:
        ff = self.ff
        ff_json = {
            "kind": ff.kind,
            "activation": ff.activation,
            "gated": ff.gated,
            "model_dim": ff.model_dim,
            "width": ff.width,
            "input": ff.input.name,
            "pre_activation": ff.pre_activation.name,
            "hidden": ff.hidden.name,
            "output": ff.output.name,
            "linears": {role: lin.to_ref().to_json() for role, lin in ff.linears.items()},
            "neuron_parameters": [v.name for v in ff.neuron_parameters],
            "parameters": ff.parameter_count,
            "nodes": [node.name for node in ff.nodes],
            **_relax_ranks(ff),
            **self.ff_wiring.to_json(),
        }
        attention_json = None
        if self.attention is not None and self.attention_wiring is not None:
            att = self.attention
            attention_json = {
                "kind": att.kind,
                "core": att.core.name,
                "input": None if att.input is None else att.input.name,
                "output": att.output.name,
                "projections": [lin.to_ref().to_json() for lin in att.projections],
                "output_projection": att.output_projection.to_ref().to_json(),
                "parameters": att.parameter_count,
                **self.attention_wiring.to_json(),
            }
        return {
            "index": self.index,
            "module": self.module,
            "ff": ff_json,
            "attention": attention_json,
        }


@dataclass
class ModelStructure:
    """What :func:`detect_structure` found in a model."""

    blocks: list[Block]
    parameter_count: int
    weight_bytes: int
    fingerprint: str
    opset: int
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def model_dim(self) -> int:
        return self.blocks[0].ff.model_dim

    @property
    def ff_parameter_count(self) -> int:
        return sum(block.ff.parameter_count for block in self.blocks)

    @property
    def attention_parameter_count(self) -> int:
        return sum(b.attention.parameter_count for b in self.blocks if b.attention is not None)

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "fingerprint": self.fingerprint,
            "opset": self.opset,
            "model_dim": self.model_dim,
            "num_blocks": len(self.blocks),
            "parameters": self.parameter_count,
            "weight_bytes": self.weight_bytes,
            "ff_parameters": self.ff_parameter_count,
            "attention_parameters": self.attention_parameter_count,
            "blocks": [block.to_json() for block in self.blocks],
        }


def _module_label(node: ir.Node) -> str | None:
    """The torch module an exporter recorded as the parent of ``node``'s linear layer.

    For display only: the dynamo exporter keeps module paths in ``namespace`` metadata, the
    TorchScript exporter in node names. Nothing depends on it being present.
    """
    namespace = node.metadata_props.get("namespace")
    if namespace:
        modules = [part.split(":")[0].strip() for part in namespace.split("/")][:-1]
    elif node.name.startswith("/"):
        prefix = node.name.strip("/").split("/")[:-1]
        modules = [".".join(prefix[: i + 1]) for i in range(len(prefix))]
    else:
        return None
    modules = [m for m in modules if m]
    if len(modules) < 2:
        return None
    return modules[-2].removeprefix("m.")


def _no_ff_message(rejected: list[Rejection]) -> str:
    """The one-line error for a graph without FFs, quoting the nearest misses."""
    if not rejected:
        return (
            "no feed-forward sublayer found: the graph has no linear layer (MatMul/Gemm with "
            "a constant 2-D weight)"
        )
    depth = max(r.depth for r in rejected)
    nearest = [r for r in rejected if r.depth == depth]
    text = "; ".join(str(r) for r in nearest[:2])
    more = len(rejected) - min(len(nearest), 2)
    if more:
        text += f"; {more} more linear layers rejected (layerfuse inspect --explain lists them)"
    return f"no feed-forward sublayer found: {text}"


def _pair(
    ff_wiring: Wiring, candidates: list[tuple[Attention, Wiring]]
) -> tuple[Attention, Wiring] | None:
    """The attention that feeds this FF on the residual stream, if wiring shows one."""
    residual = ff_wiring.residual
    if residual is None:
        return None
    for attention, wiring in candidates:
        if wiring.residual is None:
            continue
        if ff_wiring.parallel and wiring.residual.node is residual.node:
            return attention, wiring
        stream = wiring.stream_out
        if not ff_wiring.parallel and stream is not None and same_tensor(stream, residual.operand):
            return attention, wiring
    return None


def _by_order(
    ff: FeedForward, candidates: list[tuple[Attention, Wiring]], after: int, order
) -> tuple[Attention, Wiring] | None:
    """The last attention between the previous FF and this one, in graph order."""
    start = min(order[lin.node] for role, lin in ff.linears.items() if role != "down")
    preceding = [c for c in candidates if after < order[c[0].output_projection.node] < start]
    return preceding[-1] if preceding else None


def _blocks(
    feedforwards: list[FeedForward], attentions: list[Attention], order
) -> tuple[list[Block], list[Attention]]:
    """Blocks in graph order of their FFs, and the attentions no FF took."""
    width = feedforwards[0].model_dim
    free = [(att, find_wiring(att.input, att.output, width, order)) for att in attentions]
    free.sort(key=lambda item: order[item[0].output_projection.node])
    blocks, previous_end = [], -1
    for index, ff in enumerate(sorted(feedforwards, key=lambda ff: order[ff.down.node])):
        ff_wiring = find_wiring(ff.input, ff.output, ff.model_dim, order)
        paired = _pair(ff_wiring, free) or _by_order(ff, free, previous_end, order)
        notes = ()
        if paired is not None:
            free.remove(paired)
        else:
            notes = ("no attention sublayer writes the stream this FF reads",)
        attention, attention_wiring = paired or (None, None)
        module = _module_label(ff.down.node)
        blocks.append(Block(index, ff, ff_wiring, attention, attention_wiring, module, notes))
        previous_end = order[ff.down.node]
    return blocks, [att for att, _ in free]


def detect_structure(model: ir.Model) -> ModelStructure:
    """Map the model's blocks, or raise :class:`DetectionError` if it has no FF sublayer."""
    graph = model.graph
    feedforwards, rejected = scan_feedforwards(graph)
    if not feedforwards:
        refuse_quantized_linears(model)
        raise DetectionError(_no_ff_message(rejected), tuple(rejected))
    order = node_index(graph)
    ff_nodes = {node for ff in feedforwards for node in ff.nodes}
    attentions, attention_rejected = scan_attentions(graph, ff_nodes)
    blocks, unpaired = _blocks(feedforwards, attentions, order)
    rejected += attention_rejected
    rejected += [
        Rejection(
            "attention",
            describe(att.core),
            "no FF sublayer reads the stream it writes, so it belongs to no block",
            1,
        )
        for att in unpaired
    ]
    opset = model.opset_imports.get("", 0)
    return ModelStructure(
        blocks, parameter_count(model), weight_bytes(model), fingerprint(model), opset, rejected
    )


def sublayer_counts(model: ir.Model) -> tuple[int, int]:
    """How many FF and attention sublayers the graph has (zero FFs is no error here: a
    rewrite may fuse all of them into one node)."""
    feedforwards = find_feedforwards(model.graph)
    ff_nodes = {node for ff in feedforwards for node in ff.nodes}
    return len(feedforwards), len(find_attentions(model.graph, ff_nodes))
