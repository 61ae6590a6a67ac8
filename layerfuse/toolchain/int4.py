"""Block-wise int4 ``MatMulNBits`` weights, made one weight at a time (issue 24).

onnxruntime's ``MatMulNBitsQuantizer`` ``onnx.load``s the whole model and keeps copies of it:
it peaked at 5-7x the model's size, so ``quantize --int4`` could not run on the models that
most need it. Here the graph is walked lazily (weights stay memory-mapped, :mod:`onnx_ir`),
and every MatMul whose weight is a 2-D float initializer becomes a ``com.microsoft``
``MatMulNBits`` node. Each weight is read once, converted a slab of rows at a time, unmapped,
and its packed blocks and scales go straight to a scratch file, so the process holds one
weight (and one slab of float32 temporaries) at any time, whatever the model's size.

The result is byte for byte what ``MatMulNBitsQuantizer(bits=4, is_symmetric=True)`` writes
(its C++ ``quantize_matmul_4bits``, MLAS ``BlockwiseQuantizer``): for each output column n and
block of ``block`` rows of K, the element of largest magnitude ``m`` (signed) gives the scale
``m / -8`` stored in the weight's dtype (float32 for bf16, cast to bf16 after, as the Python
wrapper does), and each element becomes ``roundf(v * (1 / scale) + 8)`` clamped to 0..15,
computed in float32. B is ``[N, ceil(K / block), block / 2]`` uint8 (element 2i in the low
nibble), scales ``[N, ceil(K / block)]``; no zero points (8 implied); K is zero-padded to a
whole block as the quantizer pads it. A weight read by several MatMuls is quantized once and
read by all of their ``MatMulNBits`` nodes (the quantizer instead appends one copy per node
and its clean-up happens to keep one).
"""

from __future__ import annotations

__all__ = [
    "MS_DOMAIN",
    "Store",
    "TensorSink",
    "add_initializer",
    "in_memory",
    "int4_blocks",
    "nbits_node",
    "quantize_matmuls",
    "replace_node",
]

from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir

MS_DOMAIN = "com.microsoft"
_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})
# float32 elements converted per slab: bounds the temporaries (two float32 copies and a
# widened fp16 slab) to ~50 MB however large the weight (a 128256 x 4096 head is 2 GiB in
# float32).
_SLAB_ELEMENTS = 1 << 22

Store = Callable[[str, np.ndarray], ir.TensorProtocol]


def _quantized_slab(rows: np.ndarray, block: int, scale_dtype) -> tuple[np.ndarray, np.ndarray]:
    """``rows`` (whole blocks of K by N, float32) -> packed [N, blocks, block/2] and scales
    [N, blocks]: one slab of :func:`int4_blocks`."""
    blocks = rows.reshape(rows.shape[0] // block, block, rows.shape[1])
    low, high = blocks.min(axis=1), blocks.max(axis=1)
    extreme = np.where(np.abs(high) > np.abs(low), high, low)
    scales = (extreme / np.float32(-8)).astype(scale_dtype)
    stored = scales.astype(np.float32)
    reciprocal = np.divide(np.float32(1), stored, out=np.zeros_like(stored), where=stored != 0)
    scaled = blocks * reciprocal[:, None, :]
    scaled += np.float32(8)
    whole = np.floor(scaled)
    scaled -= whole
    # roundf rounds halves away from zero; np.rint would round them to even.
    whole += scaled >= 0.5
    q = np.clip(whole, 0, 15, out=whole).astype(np.uint8)
    packed = q[:, 0::2, :] | (q[:, 1::2, :] << 4)
    return packed.transpose(2, 0, 1), scales.T


def int4_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` ([K, N], MatMul's B; a ``[N, K]`` table passes its ``.T``) -> (B, scales)
    in ``MatMulNBits``' layout (module doc), converted ``_SLAB_ELEMENTS`` at a time so a
    memory-mapped weight is read once and never widened whole."""
    k, n = weight.shape
    count = -(-k // block)
    bf16 = weight.dtype == ml_dtypes.bfloat16
    scale_dtype = np.float32 if bf16 else weight.dtype
    packed = np.empty((n, count, block // 2), np.uint8)
    scales = np.empty((n, count), scale_dtype)
    step = max(1, _SLAB_ELEMENTS // (block * n)) * block
    for start in range(0, k, step):
        rows = np.asarray(weight[start : start + step], dtype=np.float32)
        if len(rows) % block:
            rows = np.pad(rows, ((0, block - len(rows) % block), (0, 0)))
        first, last = start // block, start // block + len(rows) // block
        packed[:, first:last], scales[:, first:last] = _quantized_slab(rows, block, scale_dtype)
    return packed, scales.astype(weight.dtype) if bf16 else scales


class TensorSink:
    """Tensors appended to one scratch file as they are made, kept as lazy external tensors:
    the quantized model is never whole in memory, and saving it copies file to file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._end = 0

    def __call__(self, name: str, array: np.ndarray) -> ir.ExternalTensor:
        array = np.ascontiguousarray(array)
        with open(self.path, "ab") as file:
            array.tofile(file)
        offset, self._end = self._end, self._end + array.nbytes
        return ir.ExternalTensor(
            self.path.name,
            offset,
            array.nbytes,
            ir.DataType.from_numpy(array.dtype),
            shape=ir.Shape(array.shape),
            name=name,
            base_dir=self.path.parent,
        )


def in_memory(name: str, array: np.ndarray) -> ir.Tensor:
    """The default :data:`Store`: keep the tensor in memory."""
    return ir.tensor(array, name=name)


def add_initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(tensor.shape),
        type=ir.TensorType(tensor.dtype),
        const_value=tensor,
    )
    graph.register_initializer(value)
    return value


def _weight(node: ir.Node) -> ir.Value | None:
    """The weight of a MatMul that ``MatMulNBits`` can replace: a 2-D float initializer."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    weight = node.inputs[1]
    if weight is None or not weight.is_initializer() or weight.const_value is None:
        return None
    tensor = weight.const_value
    return weight if tensor.dtype in _FLOATS and len(tensor.shape) == 2 else None


def _quantized(graph: ir.Graph, weight: ir.Value, block: int, store: Store) -> list[ir.Value]:
    tensor = weight.const_value
    packed, scales = int4_blocks(tensor.numpy(), block)
    if isinstance(tensor, ir.ExternalTensor):
        tensor.release()  # unmap now: every reader reads the quantized copy
    return [
        add_initializer(graph, f"{weight.name}{suffix}", store(f"{weight.name}{suffix}", array))
        for suffix, array in (("_Q4", packed), ("_scales", scales))
    ]


def nbits_node(
    activation: ir.Value,
    quantized: list[ir.Value],
    shape: tuple[int, int],
    block: int,
    accuracy_level: int | None,
    name: str | None,
) -> ir.Node:
    """``MatMulNBits`` for a ``[K, N]`` weight, with the attributes the quantizer writes
    (``accuracy_level`` only when set: most execution providers reject it)."""
    k, n = shape
    attributes = {"K": k, "N": n, "bits": 4, "block_size": block}
    if accuracy_level:
        attributes["accuracy_level"] = accuracy_level
    return ir.node(
        "MatMulNBits", [activation, *quantized], attributes=attributes, domain=MS_DOMAIN, name=name
    )


def replace_node(graph: ir.Graph, old: ir.Node, new: list[ir.Node]) -> None:
    """Put the nodes ``new`` where ``old`` was; the last one's outputs take over the old
    ones' names and readers."""
    outputs = new[-1].outputs
    ir.convenience.replace_nodes_and_values(graph, old, [old], new, old.outputs, outputs)


def quantize_matmuls(
    model: ir.Model, block: int, accuracy_level: int | None, store: Store = in_memory
) -> int:
    """Replace every MatMul with a 2-D float initializer weight by ``MatMulNBits`` (module
    doc) in ``model``'s main graph; the number replaced. A float weight leaves the graph once
    no node reads it (one also read by a Gather, say, stays float for that reader)."""
    graph, done = model.graph, {}
    replaced = 0
    for node in list(graph):
        weight = _weight(node)
        if weight is None:
            continue
        if weight.name not in done:
            done[weight.name] = _quantized(graph, weight, block, store)
        shape = tuple(weight.const_value.shape)
        name = f"{node.name}_Q4" if node.name else None
        nbits = nbits_node(node.inputs[0], done[weight.name], shape, block, accuracy_level, name)
        replace_node(graph, node, [nbits])
        replaced += 1
        if not weight.uses():
            graph.initializers.pop(weight.name)
            if weight in graph.inputs:
                graph.inputs.remove(weight)
    if replaced:
        model.opset_imports[MS_DOMAIN] = 1
    return replaced
