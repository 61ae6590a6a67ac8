"""A torch module that runs an ONNX graph: the student a recovery run trains.

Building the student from the graph instead of from a Hugging Face class keeps everything the
rewrite did, by construction and for any family or exporter: an initializer read by several
MatMuls (a tied FF window) is ONE ``nn.Parameter``, so its gradient is the sum over its
readers and it stays tied; a removed sublayer has no nodes to run; a fused run is one wide
FFN reading the run's input, in parallel, as onnxruntime runs it. Write-back is then a copy of
each parameter into the initializer of the same name.

Functions (``layerfuse.Fused*``) are inlined on a copy of the graph first; the copy keeps
weights lazy, so nothing is read twice. Nodes run in graph (topological) order as torch steps
(:mod:`layerfuse.recover.steps`); each intermediate tensor is dropped after its last reader
unless asked for (``taps``, for hidden-state distillation). Which initializers become
parameters is decided by :mod:`layerfuse.recover.weights`; the rest are buffers.
"""

from __future__ import annotations

__all__ = ["GraphModule", "inlined_copy"]

from collections.abc import Collection, Mapping, Sequence
from itertools import pairwise

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import InlinePass
from torch import nn

from layerfuse.errors import LayerfuseError
from layerfuse.recover.steps import Step, Unit, compile_graph, plan_releases, run_steps
from layerfuse.recover.weights import trainable_initializers

# Ops that read only the shape of their input: a region may take a graph input's shape.
_SHAPE_ONLY = frozenset({"Shape", "Size"})


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


class GraphModule(nn.Module):
    """Runs ``model``'s main graph in torch; its weights (see :mod:`.weights`) train.

    The steps run as :class:`~layerfuse.recover.steps.Unit` modules: one holding every step
    until :meth:`partition` splits them for sharding. Weights a single unit reads live in
    that unit; the rest (tied weights read in several units) live in ``shared``.
    """

    def __init__(self, model: ir.Model, *, trainable: set[str] | None = None) -> None:
        super().__init__()
        flat = inlined_copy(model)
        graph = flat.graph
        self.input_names = [v.name for v in graph.inputs if v.name not in graph.initializers]
        self.graph_inputs = set(self.input_names)
        self.output_names = [v.name for v in graph.outputs]
        self.tensor_names = {v.name for node in graph for v in node.outputs}
        self._steps, constants = compile_graph(graph)
        chosen = trainable_initializers(graph) if trainable is None else trainable
        self.shared = nn.ParameterList()
        self.weight_names: list[str] = []
        self._buffer_names: dict[str, str] = {}
        for name, value in graph.initializers.items():
            tensor = torch.from_numpy(np.array(value.const_value.numpy()))
            if name in chosen:
                self.shared.append(nn.Parameter(tensor))
                self.weight_names.append(name)
            else:
                constants[name] = tensor
        self._shared_names = list(self.weight_names)
        self.units = nn.ModuleList([Unit(self._steps, [], [])])
        for index, (name, tensor) in enumerate(constants.items()):
            attribute = f"const_{index}"
            self.register_buffer(attribute, tensor, persistent=False)
            self._buffer_names[name] = attribute
        self._released_for: tuple[str, ...] | None = None
        self._regions: dict[tuple[tuple[str, ...], tuple[str, ...]], list[Step]] = {}

    def named_weights(self) -> dict[str, nn.Parameter]:
        """Trainable parameters by initializer name (a tied initializer appears once), in
        graph order wherever they live."""
        found = dict(zip(self._shared_names, self.shared, strict=True))
        for unit in self.units:
            found.update(zip(unit.names, unit.weights, strict=True))
        return {name: found[name] for name in self.weight_names}

    @property
    def weights(self) -> list[nn.Parameter]:
        return list(self.named_weights().values())

    @property
    def device(self) -> torch.device:
        return next(iter(self.buffers()), torch.empty(0)).device

    def partition(self, boundaries: Collection[str]) -> list[Unit]:
        """Split the steps into units after each step that writes a tensor in ``boundaries``
        (the residual stream after each block: a unit is then a transformer block). Each
        weight moves into the one unit that reads it; one read in several stays shared."""
        cuts = {i + 1 for i, step in enumerate(self._steps) if set(step.outputs) & set(boundaries)}
        edges = sorted(cuts | {0, len(self._steps)})
        spans = list(pairwise(edges))
        weights = self.named_weights()
        readers: dict[str, set[int]] = {name: set() for name in weights}
        for index, (start, end) in enumerate(spans):
            for step in self._steps[start:end]:
                for name in step.inputs:
                    if name in readers:
                        readers[name].add(index)
        units = []
        for index, (start, end) in enumerate(spans):
            names = [name for name in self.weight_names if readers[name] == {index}]
            units.append(Unit(self._steps[start:end], names, [weights[n] for n in names]))
        self._shared_names = [name for name in self.weight_names if len(readers[name]) != 1]
        self.shared = nn.ParameterList([weights[name] for name in self._shared_names])
        self.units = nn.ModuleList(units)
        return units

    def _prepare(self, taps: tuple[str, ...]) -> None:
        if self._released_for == taps:
            return
        missing = [name for name in taps if name not in self.tensor_names]
        if missing:
            raise LayerfuseError(f"the graph has no tensor named '{missing[0]}' to read")
        plan_releases(self._steps, set(self.output_names) | set(taps))
        self._released_for = taps

    def _constants(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, attribute) for name, attribute in self._buffer_names.items()}

    def forward(
        self, feeds: Mapping[str, np.ndarray | torch.Tensor], taps: Sequence[str] = ()
    ) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """The graph outputs, and the tensors named in ``taps``."""
        taps = tuple(taps)
        self._prepare(taps)
        device = self.device
        values = self._constants()
        values.update(zip(self._shared_names, self.shared, strict=True))
        for name in self.input_names:
            if name not in feeds:
                raise LayerfuseError(f"the graph needs input '{name}'")
            feed = feeds[name]
            values[name] = (torch.from_numpy(feed) if isinstance(feed, np.ndarray) else feed).to(
                device
            )
        for unit in self.units:
            values = unit(values)
        return [values[name] for name in self.output_names], {name: values[name] for name in taps}

    def _region(self, inputs: tuple[str, ...], outputs: tuple[str, ...]) -> list[Step]:
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
        values = self._constants()
        values.update(self.named_weights())
        leading = next(iter(feeds.values())).shape[:-1]
        values.update({name: torch.zeros(leading, dtype=torch.int64) for name in self.graph_inputs})
        values.update(feeds)
        run_steps(steps, values, release=False)
        return [values[name] for name in outputs]
