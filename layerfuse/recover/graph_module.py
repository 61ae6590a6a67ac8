"""A torch module that runs an ONNX graph: the student a recovery run trains.

Building the student from the graph instead of from a Hugging Face class keeps everything the
rewrite did, by construction and for any family or exporter: an initializer read by several
MatMuls (a tied FF window) is ONE ``nn.Parameter``, so its gradient is the sum over its
readers and it stays tied; a removed sublayer has no nodes to run; a fused run is one wide
FFN reading the run's input, in parallel, as onnxruntime runs it. Write-back is then a copy of
each parameter into the initializer of the same name.

Functions (``layerfuse.Fused*``) are inlined on a copy of the graph first; the copy keeps
weights lazy, so nothing is read twice. Nodes run in graph (topological) order through the
registry of torch implementations in :mod:`layerfuse.recover.ops_math` and
:mod:`layerfuse.recover.ops_shape`; each intermediate tensor is dropped after its last reader
unless asked for (``taps``, for hidden-state distillation). Which initializers become
parameters is decided by :mod:`layerfuse.recover.weights`; the rest are buffers.
"""

from __future__ import annotations

__all__ = ["GraphModule", "inlined_copy"]

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import InlinePass
from torch import nn

from layerfuse.errors import LayerfuseError
from layerfuse.recover.ops_math import MATH_OPS
from layerfuse.recover.ops_shape import SHAPE_OPS
from layerfuse.recover.weights import trainable_initializers

OPS = {**MATH_OPS, **SHAPE_OPS}
# Ops that read only the shape of their input: a region may take a graph input's shape.
_SHAPE_ONLY = frozenset({"Shape", "Size"})
# Contrib ops onnxruntime registers in the default domain and this registry implements.
_DOMAINS = ("", "ai.onnx", "com.microsoft")


def inlined_copy(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with its functions inlined; external weights stay lazy."""
    base_dirs = {
        value.const_value.base_dir
        for value in model.graph.initializers.values()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    if base_dirs:
        ir.external_data.set_base_dir(copy.graph, next(iter(base_dirs)))
    InlinePass()(copy)
    return copy


def _attribute(attr: ir.Attr):
    kind = attr.type
    if kind == ir.AttributeType.TENSOR:
        return torch.from_numpy(np.array(attr.as_tensor().numpy()))
    if kind in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise NotImplementedError("subgraph attributes (If, Loop, Scan)")
    value = attr.value
    return list(value) if kind in (ir.AttributeType.INTS, ir.AttributeType.FLOATS) else value


def _constant_value(node: ir.Node) -> torch.Tensor:
    attrs = node.attributes
    if "value" in attrs:
        return _attribute(attrs["value"])
    for name, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if name in attrs:
            return torch.tensor(attrs[name].value, dtype=dtype)
    for name, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if name in attrs:
            return torch.tensor(list(attrs[name].value), dtype=dtype)
    raise NotImplementedError("a Constant without a numeric value")


@dataclass
class _Step:
    op: object
    inputs: list[str | None]
    outputs: list[str]
    attrs: dict
    label: str
    op_type: str
    release: list[str] = field(default_factory=list)


def _compile(graph: ir.Graph) -> tuple[list[_Step], dict[str, torch.Tensor]]:
    """The nodes as steps to run, and Constant node outputs as tensors."""
    steps, constants = [], {}
    for node in graph:
        label = f"node '{node.name}' ({node.op_type})"
        if node.domain not in _DOMAINS or (node.op_type not in OPS and node.op_type != "Constant"):
            domain = f"{node.domain}." if node.domain else ""
            raise LayerfuseError(
                f"{label}: the recovery interpreter has no implementation of {domain}{node.op_type}"
            )
        try:
            if node.op_type == "Constant":
                constants[node.outputs[0].name] = _constant_value(node)
                continue
            attrs = {name: _attribute(attr) for name, attr in node.attributes.items()}
        except NotImplementedError as exc:
            raise LayerfuseError(f"{label}: not supported ({exc})") from None
        steps.append(
            _Step(
                OPS[node.op_type],
                [None if v is None or not v.name else v.name for v in node.inputs],
                [v.name for v in node.outputs],
                attrs,
                label,
                node.op_type,
            )
        )
    return steps, constants


def _plan_releases(steps: list[_Step], keep: set[str]) -> None:
    last_use: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in step.inputs:
            if name is not None:
                last_use[name] = index
    for name, index in last_use.items():
        if name not in keep:
            steps[index].release.append(name)


class GraphModule(nn.Module):
    """Runs ``model``'s main graph in torch; its weights (see :mod:`.weights`) train."""

    def __init__(self, model: ir.Model, *, trainable: set[str] | None = None) -> None:
        super().__init__()
        flat = inlined_copy(model)
        graph = flat.graph
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.graph_inputs = set(self.input_names)
        self.output_names = [v.name for v in graph.outputs]
        self.tensor_names = {v.name for node in graph for v in node.outputs}
        self._steps, constants = _compile(graph)
        chosen = trainable_initializers(graph) if trainable is None else trainable
        self.weights = nn.ParameterList()
        self.weight_names: list[str] = []
        self._buffer_names: dict[str, str] = {}
        for name, value in graph.initializers.items():
            tensor = torch.from_numpy(np.array(value.const_value.numpy()))
            if name in chosen:
                self.weights.append(nn.Parameter(tensor))
                self.weight_names.append(name)
            else:
                constants[name] = tensor
        for index, (name, tensor) in enumerate(constants.items()):
            attribute = f"const_{index}"
            self.register_buffer(attribute, tensor, persistent=False)
            self._buffer_names[name] = attribute
        self._released_for: tuple[str, ...] | None = None
        self._regions: dict[tuple[tuple[str, ...], tuple[str, ...]], list[_Step]] = {}

    def named_weights(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by initializer name (a tied initializer appears once)."""
        return dict(zip(self.weight_names, self.weights, strict=True))

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers()), torch.empty(0)).device

    def _prepare(self, taps: tuple[str, ...]) -> None:
        if self._released_for == taps:
            return
        missing = [name for name in taps if name not in self.tensor_names]
        if missing:
            raise LayerfuseError(f"the graph has no tensor named '{missing[0]}' to read")
        for step in self._steps:
            step.release.clear()
        _plan_releases(self._steps, set(self.output_names) | set(taps))
        self._released_for = taps

    def forward(
        self, feeds: Mapping[str, np.ndarray | torch.Tensor], taps: Sequence[str] = ()
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The graph outputs, and the tensors named in ``taps``."""
        taps = tuple(taps)
        self._prepare(taps)
        device = self.device
        values: dict[str, torch.Tensor] = {
            name: getattr(self, attribute) for name, attribute in self._buffer_names.items()
        }
        values.update(self.named_weights())
        for name in self.input_names:
            if name not in feeds:
                raise LayerfuseError(f"the graph needs input '{name}'")
            feed = feeds[name]
            values[name] = (torch.from_numpy(feed) if isinstance(feed, np.ndarray) else feed).to(
                device
            )
        for step in self._steps:
            args = [None if name is None else values[name] for name in step.inputs]
            try:
                result = step.op(args, step.attrs)
            except NotImplementedError as exc:
                raise LayerfuseError(f"{step.label}: not supported ({exc})") from None
            if isinstance(result, torch.Tensor):
                result = (result,)
            for name, tensor in zip(step.outputs, result, strict=False):
                if name:
                    values[name] = tensor
            for name in step.release:
                values.pop(name, None)
        return [values[name] for name in self.output_names], {name: values[name] for name in taps}

    def _region(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> list[_Step]:
        """The steps that compute ``outputs`` from ``inputs``, weights, constants and the
        shapes (never the values) of the graph inputs."""
        key = (inputs, outputs)
        if key not in self._regions:
            known = set(inputs) | set(self._buffer_names) | set(self.weight_names)
            needed, chosen = set(outputs) - known, []
            for step in reversed(self._steps):
                if needed & set(step.outputs):
                    chosen.append(step)
                    needed -= set(step.outputs)
                    given = known | self.graph_inputs if step.op_type in _SHAPE_ONLY else known
                    needed |= {n for n in step.inputs if n is not None and n not in given}
            if needed:
                raise LayerfuseError(
                    f"the graph between {', '.join(inputs)} and {', '.join(outputs)} also "
                    f"reads '{sorted(needed)[0]}'"
                )
            self._regions[key] = chosen[::-1]
        return self._regions[key]

    def region_weights(self, inputs: Sequence[str], outputs: Sequence[str]) -> list[str]:
        """The trainable weights the part of the graph between ``inputs`` and ``outputs`` reads."""
        read = {n for step in self._region(tuple(inputs), tuple(outputs)) for n in step.inputs}
        return [name for name in self.weight_names if name in read]

    def run_region(
        self, feeds: Mapping[str, torch.Tensor], outputs: Sequence[str]
    ) -> list[torch.Tensor]:
        """Run only the part of the graph between the tensors ``feeds`` names and ``outputs``.

        Local reconstruction fits one sublayer (a tied FF) to cached activations with this: the
        sublayer's own nodes, whatever the family writes there (SwiGLU, GELU, biases, Gemm),
        run on the same parameters the whole-graph student trains, so nothing is re-derived.
        Graph inputs the region reads only through Shape/Size (GPT-2's Conv1D reshapes to
        ``[batch * seq, width]`` by the shape of ``input_ids``) are zeros shaped like the
        feeds' leading axes: the feeds are ``[batch, seq, width]``.
        """
        steps = self._region(tuple(feeds), tuple(outputs))
        values: dict[str, torch.Tensor] = {
            name: getattr(self, attribute) for name, attribute in self._buffer_names.items()
        }
        values.update(self.named_weights())
        leading = next(iter(feeds.values())).shape[:-1]
        values.update({name: torch.zeros(leading, dtype=torch.int64) for name in self.graph_inputs})
        values.update(feeds)
        for step in steps:
            args = [None if name is None else values[name] for name in step.inputs]
            result = step.op(args, step.attrs)
            if isinstance(result, torch.Tensor):
                result = (result,)
            for name, tensor in zip(step.outputs, result, strict=False):
                if name:
                    values[name] = tensor
        return [values[name] for name in outputs]
