"""Run a graph and read intermediate tensors (FF pre-activations, sublayer outputs).

:class:`ActivationTap` loads the graph structure without its weights, appends the requested
tensors as extra graph outputs, and runs that copy in onnxruntime with the weights read from
the original external-data file, so a tap on a multi-GB model copies no weights.

:func:`stream_rows` yields each batch's tapped tensors as ``[tokens, width]`` matrices with
padded positions dropped, one batch at a time: callers accumulate statistics (correlations,
Gram matrices) and the activations of a whole data set never sit in memory together.
"""

from __future__ import annotations

__all__ = ["ActivationTap", "adapt_feeds", "real_positions", "stream_rows", "token_rows"]

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from layerfuse.errors import DataError
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.inputs import empty_cache_feeds
from layerfuse.runtime.session import create_session


def _value_types(proto: onnx.ModelProto) -> dict[str, int]:
    types = {}
    for info in [*proto.graph.value_info, *proto.graph.output, *proto.graph.input]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
            types[info.name] = info.type.tensor_type.elem_type
    return types


def adapt_feeds(session, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Match ``feeds`` to the session's inputs, filling inputs other exporters add.

    Decoder graphs with a KV cache get an empty cache (a prefill of the whole batch) and,
    where they take them, position ids counted over the real tokens (Hugging Face's rule,
    also right for left padding).
    """
    adapted = {}
    batch = next(iter(feeds.values())).shape[0] if feeds else 1
    caches = empty_cache_feeds(session, batch, feeds)
    for model_input in session.get_inputs():
        name = model_input.name
        if name in caches:
            adapted[name] = caches[name]
        elif name in feeds:
            adapted[name] = feeds[name]
        elif name == "token_type_ids" and "input_ids" in feeds:
            adapted[name] = np.zeros_like(feeds["input_ids"])
        elif name == "position_ids" and "attention_mask" in feeds:
            mask = feeds["attention_mask"]
            adapted[name] = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int64)
        else:
            raise DataError(
                f"the model needs input '{name}' but the data provides {', '.join(feeds)}"
            )
    return adapted


def _subgraph_reads(node: onnx.NodeProto) -> set[str]:
    """Names the subgraphs of ``node`` (If, Loop, Scan bodies) may read from outside."""
    names: set[str] = set()
    for attribute in node.attribute:
        graphs = [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else []
        graphs += list(attribute.graphs)
        for graph in graphs:
            for inner in graph.node:
                names.update(inner.input)
                names.update(_subgraph_reads(inner))
    return names


def _keep(field, wanted: set[str]) -> None:
    """Keep the entries of a repeated proto field whose name is in ``wanted``."""
    kept = [entry for entry in field if entry.name in wanted]
    del field[:]
    field.extend(kept)


def _cut_to(graph: onnx.GraphProto, outputs: list[onnx.ValueInfoProto]) -> None:
    """Make ``outputs`` the graph's only outputs and drop every node, input and weight they
    do not depend on: tapping the FFs of blocks 0..K runs only those blocks, never the head
    (on a 262k vocabulary its MatMul and ``[batch x seq x vocab]`` logits dwarf a block)."""
    needed = {output.name for output in outputs}
    kept = []
    for node in reversed(graph.node):
        if needed.intersection(node.output):
            kept.append(node)
            needed.update(node.input)
            needed.update(_subgraph_reads(node))
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for field in (graph.input, graph.initializer, graph.value_info):
        _keep(field, needed)
    del graph.output[:]
    graph.output.extend(outputs)


def _outputs(names: list[str], types: dict[str, int]) -> list[onnx.ValueInfoProto]:
    return [onnx.helper.make_tensor_value_info(name, types[name], None) for name in names]


class ActivationTap:
    """A session over a graph that also returns the tensors named in ``names``.

    ``model`` is a path, or an in-memory onnx_ir model (a candidate rewrite) whose untouched
    weights still live in the external data of the folder ``external_data_dir``. With
    ``model_outputs=False`` the graph is cut to what the taps depend on (see :func:`_cut_to`)
    and :meth:`run` returns no model outputs. Calibration runs a few batches, so by default
    fp16/bf16 weights on CPU are cast as they run rather than copied to fp32 at load
    (``lean``, see :mod:`layerfuse.runtime.widening`); the recovery teacher, which runs every
    step, passes None (only when the copies would not fit).
    """

    def __init__(
        self,
        model: str | os.PathLike | ir.Model,
        names: Sequence[str],
        *,
        provider: str = "auto",
        threads: int | None = None,
        external_data_dir: str | os.PathLike | None = None,
        model_outputs: bool = True,
        lean: bool | None = True,
    ) -> None:
        if isinstance(model, ir.Model):
            proto = ir.serde.serialize_model(model)
            label = model.graph.name or "model"
        else:
            proto = onnx.load(model, load_external_data=False)
            external_data_dir = Path(model).parent
            label = str(model)
        types = _value_types(proto)
        missing = [name for name in names if name not in types]
        if missing:
            types.update(_value_types(onnx.shape_inference.infer_shapes(proto)))
            missing = [name for name in names if name not in types]
        if missing:
            raise DataError(f"{label}: no tensor named {', '.join(missing[:3])} to tap")
        self.names = list(names)
        if model_outputs:
            self.model_outputs = [output.name for output in proto.graph.output]
            taps = [name for name in self.names if name not in self.model_outputs]
            proto.graph.output.extend(_outputs(taps, types))
        else:
            self.model_outputs = []
            _cut_to(proto.graph, _outputs(self.names, types))
        self.session = create_session(
            proto, provider=provider, threads=threads, external_data_dir=external_data_dir,
            lean=lean,
        )  # fmt: skip

    def run(self, feeds: dict[str, np.ndarray]) -> tuple[list[np.ndarray], dict[str, np.ndarray]]:
        """The model's own outputs and the tapped tensors for one batch."""
        fetch = self.model_outputs + [n for n in self.names if n not in self.model_outputs]
        values = self.session.run(fetch, adapt_feeds(self.session, feeds))
        by_name = dict(zip(fetch, values, strict=True))
        return [by_name[n] for n in self.model_outputs], {n: by_name[n] for n in self.names}

    def tapped(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Only the tapped tensors for one batch: the model's own outputs (a causal LM's
        ``[batch x seq x vocab]`` logits, the KV cache) are not fetched into numpy."""
        values = self.session.run(self.names, adapt_feeds(self.session, feeds))
        return dict(zip(self.names, values, strict=True))


def real_positions(rows: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Indices of the rows of ``[positions, width]`` ``rows`` that are real tokens."""
    if mask is None:
        return np.arange(rows.shape[0])
    flat = mask.reshape(-1).astype(bool)
    if flat.size != rows.shape[0]:
        raise DataError(
            f"cannot match a tensor of {rows.shape[0]} positions to a batch of {flat.size} tokens"
        )
    return np.flatnonzero(flat)


def token_rows(array: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """``array`` as ``[positions, width]`` float32 rows, keeping only real-token positions.

    Works whether the exporter kept ``[batch, seq, width]`` or flattened to
    ``[batch * seq, width]`` (GPT-2's Conv1D Gemms), and whatever float dtype the graph
    computes in (fp16, bf16 activations become float32 here, once, for the statistics).
    """
    rows = array.reshape(-1, array.shape[-1])
    if mask is None:
        return rows.astype(np.float32, copy=False)
    return rows[real_positions(rows, mask)].astype(np.float32, copy=False)


def stream_rows(
    tap: ActivationTap,
    batches: Iterable,
    *,
    total: int | None = None,
    reporter: Reporter = SILENT,
    description: str = "calibrating",
) -> Iterator[dict[str, np.ndarray]]:
    """For each input batch, the tapped tensors as token rows (see :func:`token_rows`)."""
    for batch in reporter.track(batches, total, description):
        yield {
            name: token_rows(value, batch.mask) for name, value in tap.tapped(batch.feeds).items()
        }
