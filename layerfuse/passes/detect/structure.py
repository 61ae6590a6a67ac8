"""Assemble detected sublayers into transformer blocks: the map every pass works from.

A block is one FF sublayer plus the attention sublayer that precedes it on the residual
stream, each with its normalization and residual Add. ``norm_position`` says whether the norm
sits before the sublayer (pre-norm: Llama, GPT-2, ViT) or after the residual Add (post-norm:
BERT); passes that rewire the residual stream need to know.

:meth:`ModelStructure.to_json` is the stable schema ``layerfuse inspect --json`` prints and
plans refer to (by node and initializer names, which survive a save/load round trip).
"""

from __future__ import annotations

__all__ = ["SCHEMA", "Block", "ModelStructure", "Wiring", "detect_structure", "sublayer_counts"]

from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.errors import DetectionError
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.graph import consumers, node_index
from layerfuse.model.io import parameter_count, weight_bytes
from layerfuse.passes.detect.attention import Attention, find_attentions
from layerfuse.passes.detect.feedforward import FeedForward, find_feedforwards
from layerfuse.passes.detect.norms import Norm, Residual, find_norm, find_residual, same_tensor

SCHEMA = "layerfuse.structure/1"


@dataclass
class Wiring:
    """Norm and residual bookkeeping shared by attention and FF sublayers.

    ``post_norm`` is the norm applied after the residual Add in post-norm models; its output
    is the residual stream the next sublayer reads.
    """

    norm: Norm | None
    norm_position: str | None
    residual: Residual | None
    post_norm: Norm | None = None

    @property
    def stream_out(self) -> ir.Value | None:
        """The residual stream after this sublayer (after its post-norm, if any)."""
        if self.post_norm is not None:
            return self.post_norm.output
        return None if self.residual is None else self.residual.output

    def to_json(self) -> dict:
        return {
            "norm": None if self.norm is None else self.norm.to_json(),
            "norm_position": self.norm_position,
            "residual": None if self.residual is None else self.residual.to_json(),
            "post_norm": None if self.post_norm is None else self.post_norm.to_json(),
        }


@dataclass
class Block:
    index: int
    ff: FeedForward
    ff_wiring: Wiring
    attention: Attention | None
    attention_wiring: Wiring | None
    module: str | None

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


def _wiring(
    sublayer_input: ir.Value | None, output: ir.Value, width: int, order: dict[ir.Node, int]
) -> Wiring:
    residual = find_residual(output)
    norm = None if sublayer_input is None else find_norm(sublayer_input, width, order)
    position = None
    if residual is not None:
        if norm is not None and same_tensor(norm.input, residual.operand):
            position = "pre"
        elif sublayer_input is not None and same_tensor(sublayer_input, residual.operand):
            return Wiring(None, "post", residual, _post_norm(residual, width, order))
    return Wiring(norm, position, residual)


def _post_norm(residual: Residual, width: int, order: dict[ir.Node, int]) -> Norm | None:
    """The norm reading the residual Add's output (post-norm models such as BERT)."""
    for node in consumers(residual.output):
        norm = find_norm(node.outputs[0], width, order) if node.outputs else None
        if norm is not None and same_tensor(norm.input, residual.output):
            return norm
    return None


def detect_structure(model: ir.Model) -> ModelStructure:
    """Map the model's blocks, or raise :class:`DetectionError` if it has no FF sublayer."""
    graph = model.graph
    feedforwards = find_feedforwards(graph)
    if not feedforwards:
        raise DetectionError(
            "no feed-forward sublayer found: expected MatMul/Gemm with a constant weight, "
            "an elementwise activation (GELU, ReLU, SiLU, SwiGLU, GeGLU), then MatMul/Gemm"
        )
    order = node_index(graph)
    ff_nodes = {node for ff in feedforwards for node in ff.nodes}
    attentions = find_attentions(graph, ff_nodes)
    blocks = []
    previous_end = -1
    remaining = sorted(attentions, key=lambda att: order[att.output_projection.node])
    for index, ff in enumerate(sorted(feedforwards, key=lambda ff: order[ff.down.node])):
        start = min(order[lin.node] for role, lin in ff.linears.items() if role != "down")
        preceding = [
            att for att in remaining if previous_end < order[att.output_projection.node] < start
        ]
        attention = preceding[-1] if preceding else None
        attention_wiring = None
        if attention is not None:
            attention_wiring = _wiring(attention.input, attention.output, ff.model_dim, order)
        blocks.append(
            Block(
                index=index,
                ff=ff,
                ff_wiring=_wiring(ff.input, ff.output, ff.model_dim, order),
                attention=attention,
                attention_wiring=attention_wiring,
                module=_module_label(ff.down.node),
            )
        )
        previous_end = order[ff.down.node]
    opset = model.opset_imports.get("", 0)
    return ModelStructure(
        blocks, parameter_count(model), weight_bytes(model), fingerprint(model), opset
    )


def sublayer_counts(model: ir.Model) -> tuple[int, int]:
    """How many FF and attention sublayers the graph has (zero FFs is no error here: a
    rewrite may fuse all of them into one node)."""
    feedforwards = find_feedforwards(model.graph)
    ff_nodes = {node for ff in feedforwards for node in ff.nodes}
    return len(feedforwards), len(find_attentions(model.graph, ff_nodes))
