"""Do ties survive a conversion? Trace every tied set of the source into the converted graph.

A tied set is an initializer that several MatMul/Gemm nodes read as their weight
(:func:`layerfuse.model.stats.shared_matmul_weights`). Converters rewrite those nodes
(MatMul -> MatMulNBits, DynamicQuantizeLinear + MatMulInteger, Q/DQ pairs, Casts) but keep
two names: the activation a reader multiplies and the tensor it produces. So each reader is
found again as the subgraph between those two names, and the initializers inside it are what
it reads now. The tie is kept when every reader of a set reads the same initializers; a
converter that wrote one quantized copy per consumer shows up as readers reading different
ones. Where a converter renamed the activation (a norm fused into its neighbour, as the
transformers optimizer does), the weight is looked up by its own name instead.
"""

from __future__ import annotations

__all__ = [
    "TieCheck",
    "TiedSet",
    "check_ties",
    "deduplicate_initializers",
    "tied_sets",
]

from dataclasses import asdict, dataclass, field

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from layerfuse.model.graph import weight_source
from layerfuse.model.stats import shared_matmul_weights

# Initializers below this many elements (scalar scales and zero points) are not weights.
_MIN_WEIGHT_ELEMENTS = 16


@dataclass
class TiedSet:
    """One shared weight of the source: its name and, per reader, (activation, output)."""

    weight: str
    readers: list[tuple[str, str]]
    nbytes: int


@dataclass
class TieCheck:
    """Where each tied set went: the initializers its readers read in the converted graph."""

    weight: str
    readers: int
    reads: list[str] = field(default_factory=list)
    kept: bool = False
    traced_by: str = "dataflow"

    def to_json(self) -> dict:
        return asdict(self)


def tied_sets(model: ir.Model) -> list[TiedSet]:
    shared = shared_matmul_weights(model)
    readers: dict[str, list[tuple[str, str]]] = {name: [] for name in shared}
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm") and len(node.inputs) > 1:
            source = weight_source(node.inputs[1])
            if source is not None and source.initializer.name in readers:
                readers[source.initializer.name].append((node.inputs[0].name, node.outputs[0].name))
    return [
        TiedSet(name, pairs, model.graph.initializers[name].const_value.nbytes)
        for name, pairs in readers.items()
    ]


def _is_weight(value: ir.Value) -> bool:
    tensor = value.const_value
    return value.is_initializer() and tensor is not None and tensor.size >= _MIN_WEIGHT_ELEMENTS


def _reader_weights(values: dict[str, ir.Value], activation: str, output: str) -> set[str] | None:
    """Weight initializers between ``activation`` and ``output``; None when either is gone."""
    if activation not in values or output not in values:
        return None
    found: set[str] = set()
    stack, seen = [values[output]], set()
    while stack:
        value = stack.pop()
        if value.name in seen or value.name == activation:
            continue
        seen.add(value.name)
        if _is_weight(value):
            found.add(value.name)
            continue
        producer = value.producer()
        if producer is not None:
            stack.extend(v for v in producer.inputs if v is not None)
    return found


def _values(model: ir.Model) -> dict[str, ir.Value]:
    values = {value.name: value for value in model.graph.inputs}
    values.update(model.graph.initializers)
    for node in model.graph:
        values.update({value.name: value for value in node.outputs})
    return values


def check_ties(source_sets: list[TiedSet], converted: ir.Model) -> list[TieCheck]:
    """One :class:`TieCheck` per tied set of the source, traced through ``converted``."""
    values = _values(converted)
    checks = []
    for tied in source_sets:
        reads = [_reader_weights(values, a, out) for a, out in tied.readers]
        check = TieCheck(tied.weight, len(tied.readers))
        if all(r is not None for r in reads):
            check.reads = sorted(set().union(*reads))
            check.kept = bool(reads[0]) and all(r == reads[0] for r in reads)
        else:
            count = shared_matmul_weights(converted).get(tied.weight, 0)
            check.traced_by = "name"
            check.reads = [tied.weight] if count else []
            check.kept = count == len(tied.readers)
        checks.append(check)
    return checks


def deduplicate_initializers(model: ir.Model) -> ir.Model:
    """Point every reader of equal-content initializers at one of them (safety net for
    converters that write an identical copy per consumer under different names)."""
    common_passes.DeduplicateHashedInitializersPass()(model)
    return model
