"""Quantize tied word embeddings once, for the input lookup and the output projection alike.

Models with tied word embeddings (SmolLM2, GPT-2) read one ``[vocab, hidden]`` table twice:
``Gather`` for the input embedding and ``Transpose`` + ``MatMul`` for the logits.
onnxruntime's quantizers touch neither (the MatMul's weight is not an initializer, Gather is
not a MatMul), so the largest tensor of a small model stays float32: 113 MB of SmolLM2's
540 MB, which then dominates the quantized file and shrinks every saving measured against it
(a tie that removes 20% of the float32 weights would remove only 12% of the int8 ones).

This rewrite quantizes the table once, in the layout the output projection's kernel reads,
and dequantizes only the gathered rows for the lookup (a few kB per token), so both readers
share one quantized initializer. The rewrite works on a lazy :mod:`onnx_ir` model: only the
table is read, and its quantized copy goes wherever the caller's ``store`` puts tensors (the
streaming int4 path writes it to its scratch file).

- ``int4``: ``MatMulNBits`` blocks made by :func:`~layerfuse.toolchain.int4.int4_blocks`, as
  every other weight (``[vocab, hidden/block, block/2]`` uint8, element 2i in the low nibble,
  zero point 8, one float scale per block); the lookup gathers rows and unpacks nibbles with
  ``BitwiseAnd``/``BitShift``.
- ``int8``: ``DynamicQuantizeMatMul`` with the table stored transposed (``[hidden, vocab]``
  int8, one scale per vocabulary row, symmetric); the lookup gathers columns.
"""

from __future__ import annotations

__all__ = ["share_tied_embeddings"]

import numpy as np
import onnx_ir as ir

from layerfuse.model.graph import consumers
from layerfuse.toolchain.int4 import (
    MS_DOMAIN,
    Store,
    add_initializer,
    in_memory,
    int4_blocks,
    nbits_node,
    replace_node,
)

Found = tuple[ir.Value, list[ir.Node], list[ir.Node], list[ir.Node]]


def _perm(node: ir.Node) -> list[int]:
    attribute = node.attributes.get("perm")
    return [] if attribute is None else list(attribute.as_ints())


def _is_tied(table: ir.Value, lookups, transposes, readers) -> bool:
    return (
        bool(lookups and transposes)
        and len(lookups) + len(transposes) == len(readers)
        and all(n.attributes.get_int("axis", 0) == 0 for n in lookups)
        and all(_perm(t) == [1, 0] and not t.outputs[0].is_graph_output() for t in transposes)
        and all(
            m.op_type == "MatMul" and m.inputs[1] is t.outputs[0]
            for t in transposes
            for m in consumers(t.outputs[0])
        )
    )


def _tied_table(graph: ir.Graph) -> Found | None:
    """(table, lookups, transposes, projections): a 2-D float32 initializer read only by
    Gather (axis 0) and by Transpose(perm 1,0) whose outputs feed only MatMul weights (and are
    no graph output); else None."""
    for table in graph.initializers.values():
        tensor, readers = table.const_value, consumers(table)
        if tensor is None or tensor.dtype != ir.DataType.FLOAT or len(tensor.shape) != 2:
            continue
        lookups = [n for n in readers if n.op_type == "Gather" and n.inputs[0] is table]
        transposes = [n for n in readers if n.op_type == "Transpose"]
        if readers and _is_tied(table, lookups, transposes, readers):
            projections = [m for t in transposes for m in consumers(t.outputs[0])]
            return table, lookups, transposes, projections
    return None


def _op(nodes: list[ir.Node], name: str, op_type: str, inputs, **attributes) -> ir.Value:
    """Append one node computing a value called ``name``; that value."""
    output = ir.Value(name=name)
    nodes.append(ir.node(op_type, inputs, attributes=attributes, outputs=[output], name=name))
    return output


def _int4_lookup(ids: ir.Value, out: str, quantized, c: dict) -> list[ir.Node]:
    """Gathered rows -> nibbles -> (q - 8) * scale -> [..., hidden]."""
    p, nodes = f"{out}/dq", []
    rows = _op(nodes, f"{p}/rows", "Gather", [quantized[0], ids])
    lo = _op(nodes, f"{p}/lo", "BitwiseAnd", [rows, c["15"]])
    hi = _op(nodes, f"{p}/hi", "BitShift", [rows, c["4"]], direction="RIGHT")
    lo1 = _op(nodes, f"{p}/lo1", "Unsqueeze", [lo, c["-1"]])
    hi1 = _op(nodes, f"{p}/hi1", "Unsqueeze", [hi, c["-1"]])
    pairs = _op(nodes, f"{p}/pairs", "Concat", [lo1, hi1], axis=-1)
    floats = _op(nodes, f"{p}/float", "Cast", [pairs], to=int(ir.DataType.FLOAT))
    centred = _op(nodes, f"{p}/centred", "Sub", [floats, c["8"]])
    values = _op(nodes, f"{p}/values", "Reshape", [centred, c["blocks"]])
    scales = _op(nodes, f"{p}/scales", "Gather", [quantized[1], ids])
    scales1 = _op(nodes, f"{p}/scales1", "Unsqueeze", [scales, c["-1"]])
    scaled = _op(nodes, f"{p}/scaled", "Mul", [values, scales1])
    _op(nodes, out, "Reshape", [scaled, c["rows"]])
    return nodes


def _int8_lookup(ids: ir.Value, out: str, quantized, c: dict, rank: int) -> list[ir.Node]:
    """Gathered columns of the transposed table -> rows -> q * scale."""
    p, nodes = f"{out}/dq", []
    columns = _op(nodes, f"{p}/columns", "Gather", [quantized[0], ids], axis=1)
    rows = _op(nodes, f"{p}/rows", "Transpose", [columns], perm=[*range(1, rank + 1), 0])
    floats = _op(nodes, f"{p}/float", "Cast", [rows], to=int(ir.DataType.FLOAT))
    scales = _op(nodes, f"{p}/scales", "Gather", [quantized[1], ids])
    scales1 = _op(nodes, f"{p}/scales1", "Unsqueeze", [scales, c["-1"]])
    _op(nodes, out, "Mul", [floats, scales1])
    return nodes


def _constants(graph: ir.Graph, name: str, scheme: str, rank: int, hidden: int, block: int):
    keep = [0] * rank
    arrays = {"-1": np.array([-1], np.int64)}
    if scheme == "int4":
        arrays |= {
            "15": np.array(15, np.uint8),
            "4": np.array(4, np.uint8),
            "8": np.array(8, np.float32),
            "blocks": np.array([*keep, hidden // block, block], np.int64),
            "rows": np.array([*keep, hidden], np.int64),
        }
    return {
        key: add_initializer(graph, f"{name}/{key}", ir.tensor(array, name=f"{name}/{key}"))
        for key, array in arrays.items()
    }


def _quantized_table(table: np.ndarray, scheme: str, block: int) -> dict[str, np.ndarray]:
    if scheme == "int4":
        packed, scales = int4_blocks(table.T, block)
        return {"_Q4": packed, "_scales": scales}
    scales = np.abs(table).max(axis=1) / 127.0
    scales[scales == 0] = 1.0
    q = np.clip(np.rint(table / scales[:, None]), -127, 127).astype(np.int8)
    return {"_Q8": np.ascontiguousarray(q.T), "_scales": scales.astype(np.float32)}


def _quantize(graph: ir.Graph, table: ir.Value, scheme: str, block: int, store: Store):
    tensor = table.const_value
    arrays = _quantized_table(tensor.numpy(), scheme, block)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()
    return [
        add_initializer(graph, f"{table.name}{suffix}", store(f"{table.name}{suffix}", array))
        for suffix, array in arrays.items()
    ]


def _projection(node: ir.Node, scheme: str, quantized, shape, block, accuracy_level) -> ir.Node:
    if scheme == "int8":
        inputs = [node.inputs[0], *quantized]
        return ir.node("DynamicQuantizeMatMul", inputs, domain=MS_DOMAIN)
    rows, hidden = shape
    return nbits_node(node.inputs[0], quantized, (hidden, rows), block, accuracy_level, None)


def share_tied_embeddings(
    model: ir.Model,
    scheme: str,
    block: int = 32,
    accuracy_level: int | None = None,
    store: Store = in_memory,
) -> str | None:
    """Rewrite ``model`` in place (see the module doc); the table's name, or None when the
    model has no tied word embeddings, their index rank is unknown or blocks do not fit."""
    graph = model.graph
    found = _tied_table(graph)
    if found is None:
        return None
    table, lookups, transposes, projections = found
    ranks = {None if n.inputs[1].shape is None else len(n.inputs[1].shape) for n in lookups}
    shape = tuple(table.const_value.shape)
    if None in ranks or len(ranks) != 1 or (scheme == "int4" and shape[1] % block):
        return None
    rank, name = ranks.pop(), table.name
    constants = _constants(graph, name, scheme, rank, shape[1], block)
    quantized = _quantize(graph, table, scheme, block, store)
    for node in projections:
        replace_node(
            graph, node, [_projection(node, scheme, quantized, shape, block, accuracy_level)]
        )
    graph.remove(transposes, safe=True)
    for node in lookups:
        ids, out = node.inputs[1], node.outputs[0].name
        if scheme == "int4":
            replace_node(graph, node, _int4_lookup(ids, out, quantized, constants))
        else:
            replace_node(graph, node, _int8_lookup(ids, out, quantized, constants, rank))
    graph.initializers.pop(name)
    if MS_DOMAIN not in model.opset_imports:
        model.opset_imports[MS_DOMAIN] = 1
    return name
