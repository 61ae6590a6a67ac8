"""Linear layers as exporters write them: MatMul or Gemm reading a constant weight.

The weight may be stored ``[in, out]`` (dynamo, TorchScript after folding) or ``[out, in]``
behind a Transpose or a ``Gemm(transB=1)``, possibly behind a Cast. :class:`Linear` hides
those layouts: passes read and write one canonical float32 ``[in, out]`` matrix and the layer
writes it back in the layout and dtype the graph already uses, so a rewrite never adds a
per-consumer Transpose or Cast (which would make ORT fold a private copy of a shared weight).

A fused projection (Phi-3's ``gate_up_proj``: one MatMul whose output a Split or Slices cut
into column ranges on the last axis) is one node but several layers: :func:`column_parts`
gives one :class:`Linear` per range, each reading and counting only its own columns and
producing the Split/Slice output. The graph keeps its single MatMul; a rewrite that writes
the weight back writes every part of it at once (see ``merge.tie``).
"""

from __future__ import annotations

__all__ = ["Linear", "LinearRef", "as_linear", "column_parts"]

import contextlib
from dataclasses import dataclass, replace

import numpy as np
import onnx_ir as ir

from layerfuse.model.graph import constant_array, consumers, is_constant, weight_source


def _release_mapping(tensor: ir.TensorProtocol | None) -> None:
    """Unmap an external tensor's file (it maps again if read again); a tensor someone else
    still holds a view of stays mapped."""
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):
            tensor.release()


@dataclass(frozen=True)
class LinearRef:
    """The JSON-friendly identity of a linear layer, by node and initializer names."""

    node: str
    weight: str
    shape: tuple[int, int]
    transposed: bool
    bias: str | None
    bias_node: str | None
    columns: tuple[int, int] | None = None

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "weight": self.weight,
            "shape": list(self.shape),
            "transposed": self.transposed,
            "bias": self.bias,
            "bias_node": self.bias_node,
            "columns": None if self.columns is None else list(self.columns),
        }


@dataclass
class Linear:
    """A MatMul/Gemm node with a constant 2-D weight, and its optional bias.

    ``columns`` (with ``part``, the Split/Slice output holding them, and ``part_node``) makes
    it one column range of a fused projection; everything but the stored tensors and
    :attr:`full_output` then refers to that range only.
    """

    node: ir.Node
    weight: ir.Value
    weight_path: tuple[ir.Node, ...]
    transposed: bool
    bias: ir.Value | None
    bias_node: ir.Node | None
    columns: tuple[int, int] | None = None
    part: ir.Value | None = None
    part_node: ir.Node | None = None

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def full_output(self) -> ir.Value:
        """The node's whole result, after the bias when the bias is a separate Add."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def output(self) -> ir.Value:
        """The layer's result: :attr:`full_output`, or the part holding its columns."""
        return self.part if self.part is not None else self.full_output

    @property
    def in_features(self) -> int:
        shape = self.weight.shape
        return int(shape[0] if not self.transposed else shape[1])

    @property
    def stored_out_features(self) -> int:
        """Columns of the stored weight (all parts of a fused projection)."""
        shape = self.weight.shape
        return int(shape[1] if not self.transposed else shape[0])

    @property
    def out_features(self) -> int:
        if self.columns is not None:
            return self.columns[1] - self.columns[0]
        return self.stored_out_features

    @property
    def parameter_count(self) -> int:
        bias = 0 if self.bias is None else self.out_features
        return self.in_features * self.out_features + bias

    @property
    def consumed_weight(self) -> ir.Value:
        """The value the node reads as its weight (the end of the Transpose/Cast chain)."""
        return self.node.inputs[1]

    def _own(self, data: np.ndarray) -> np.ndarray:
        """``data``'s last axis cut to this layer's columns."""
        if self.columns is None:
            return data
        return np.ascontiguousarray(data[..., self.columns[0] : self.columns[1]])

    def read_weight(self) -> np.ndarray:
        """The weight as float32 ``[in_features, out_features]``.

        One copy is made, and a weight in external data is unmapped after it, so reading a
        window of FFs does not keep every one of them resident until the pass ends.
        """
        tensor = self.weight.const_value
        stored = tensor.numpy()
        full = np.array(stored.T if self.transposed else stored, dtype=np.float32, order="C")
        del stored
        _release_mapping(tensor)
        return np.ascontiguousarray(self._own(full))

    def read_bias(self) -> np.ndarray | None:
        data = constant_array(self.bias)
        return None if data is None else self._own(data.reshape(-1).astype(np.float32))

    @property
    def consumed_transposed(self) -> bool:
        """Whether the node itself reads its weight as ``[out, in]`` (``Gemm(transB=1)``)."""
        return self.node.op_type == "Gemm" and bool(self.node.attributes.get_int("transB", 0))

    def consumed_dtype(self) -> ir.DataType:
        dtype = self.weight.const_value.dtype
        for node in self.weight_path:
            if node.op_type == "Cast":
                dtype = ir.DataType(node.attributes.get_int("to"))
        return dtype

    def consumed_weight_tensor(self, canonical: np.ndarray, name: str) -> ir.Tensor:
        """``canonical`` ``[in, out]`` in the layout and dtype the node reads directly.

        A weight shared by several nodes is stored this way so that nothing per consumer
        (Transpose, Cast) stands between it and the node.
        """
        stored = canonical.T if self.consumed_transposed else canonical
        numpy_dtype = self.consumed_dtype().numpy()
        return ir.tensor(np.ascontiguousarray(stored.astype(numpy_dtype)), name=name)

    def bias_tensor(self, canonical: np.ndarray, name: str) -> ir.Tensor:
        original = constant_array(self.bias)
        assert original is not None, "bias_tensor needs a layer with a bias"
        return ir.tensor(
            np.ascontiguousarray(canonical.astype(original.dtype).reshape(original.shape)),
            name=name,
        )

    def bias_input_index(self) -> tuple[ir.Node, int]:
        """The node and input slot that carry the bias."""
        if self.bias_node is None:
            return self.node, 2
        return self.bias_node, 0 if self.bias_node.inputs[0] is self.bias else 1

    def to_ref(self) -> LinearRef:
        return LinearRef(
            node=self.node.name,
            weight=self.weight.name,
            shape=(self.in_features, self.out_features),
            transposed=self.transposed,
            bias=None if self.bias is None else self.bias.name,
            bias_node=None if self.bias_node is None else self.bias_node.name,
            columns=self.columns,
        )


def _matmul_bias(output: ir.Value, out_features: int) -> tuple[ir.Value, ir.Node] | None:
    users = consumers(output)
    if len(users) != 1 or users[0].op_type != "Add" or output.is_graph_output():
        return None
    add = users[0]
    other = add.inputs[1] if add.inputs[0] is output else add.inputs[0]
    data = constant_array(other)
    if (
        data is None
        or data.size != out_features
        or (data.ndim > 1 and data.shape[:-1] != (1,) * (data.ndim - 1))
    ):
        return None
    return other, add


def as_linear(node: ir.Node) -> Linear | None:
    """Interpret ``node`` as a linear layer, or return None if it is not one."""
    if node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return None
    if node.op_type not in ("MatMul", "Gemm") or is_constant(node.inputs[0]):
        return None
    source = weight_source(node.inputs[1])
    if source is None:
        return None
    weight, path, flips = source.initializer, source.path, source.transposes
    if node.op_type == "MatMul":
        linear = Linear(node, weight, path, flips % 2 == 1, None, None)
        bias = _matmul_bias(node.outputs[0], linear.out_features)
        if bias is not None:
            linear.bias, linear.bias_node = bias
        return linear
    attrs = node.attributes
    if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0:
        return None
    trans_b = attrs.get_int("transB", 0)
    linear = Linear(node, weight, path, (flips + trans_b) % 2 == 1, None, None)
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        bias = constant_array(node.inputs[2])
        if bias is None or bias.size != linear.out_features or attrs.get_float("beta", 1.0) != 1.0:
            return None
        linear.bias = node.inputs[2]
    return linear


def _last_axis(axis: int, value: ir.Value) -> bool:
    rank = None if value.shape is None else len(value.shape)
    return axis == -1 or (rank is not None and axis == rank - 1)


def _scalar(value: ir.Value | None) -> int | None:
    data = constant_array(value)
    return None if data is None or data.size != 1 else int(data.reshape(-1)[0])


def _column_ranges(node: ir.Node, value: ir.Value, width: int) -> list | None:
    """``(start, stop, output)`` for each column range ``node`` cuts from ``value``, or None
    when it is not a Split/Slice of constant bounds on the last axis."""
    if node.inputs[0] is not value or any(v is value for v in node.inputs[1:]):
        return None
    if node.op_type == "Split":
        if not _last_axis(node.attributes.get_int("axis", 0), value):
            return None
        sizes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        count = len(node.outputs)
        if sizes is None:
            if width % count:
                return None
            sizes = [width // count] * count
        bounds = np.cumsum([0, *[int(s) for s in np.reshape(sizes, -1)]])
        if len(bounds) != count + 1:
            return None
        pairs = zip(bounds[:-1], bounds[1:], node.outputs, strict=True)
        return [(int(a), int(b), v) for a, b, v in pairs]
    if node.op_type != "Slice" or len(node.inputs) < 4:
        return None
    start, stop, axis = (_scalar(node.inputs[i]) for i in (1, 2, 3))
    step = _scalar(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] else 1
    if None in (start, stop, axis) or step != 1 or not _last_axis(axis, value):
        return None
    start, stop = (min(i + width if i < 0 else i, width) for i in (start, stop))
    return [(start, stop, node.outputs[0])]


def column_parts(linear: Linear) -> list[Linear]:
    """The column ranges of a fused projection, one :class:`Linear` each; empty when the
    layer's output is not cut by Split/Slice into ranges that partition all its columns."""
    value = linear.full_output
    users = consumers(value)
    if linear.columns is not None or not users or value.is_graph_output():
        return []
    ranges = []
    for user in users:
        found = _column_ranges(user, value, linear.stored_out_features)
        if found is None:
            return []
        ranges += [(start, stop, part, user) for start, stop, part in found]
    ranges.sort(key=lambda item: item[:2])
    edge = 0
    for start, stop, _, _ in ranges:
        if start != edge or stop <= start:
            return []
        edge = stop
    if edge != linear.stored_out_features or len(ranges) < 2:
        return []
    return [
        replace(linear, columns=(start, stop), part=part, part_node=user)
        for start, stop, part, user in ranges
    ]
