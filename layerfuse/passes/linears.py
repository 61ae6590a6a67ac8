"""Linear layers as exporters write them: MatMul or Gemm reading a constant weight.

The weight may be stored ``[in, out]`` (dynamo, TorchScript after folding) or ``[out, in]``
behind a Transpose or a ``Gemm(transB=1)``, possibly behind a Cast. :class:`Linear` hides
those layouts: passes read and write one canonical float32 ``[in, out]`` matrix and the layer
writes it back in the layout and dtype the graph already uses, so a rewrite never adds a
per-consumer Transpose or Cast (which would make ORT fold a private copy of a shared weight).
"""

from __future__ import annotations

__all__ = ["Linear", "LinearRef", "as_linear"]

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from layerfuse.model.graph import constant_array, consumers, is_constant, weight_source


@dataclass(frozen=True)
class LinearRef:
    """The JSON-friendly identity of a linear layer, by node and initializer names."""

    node: str
    weight: str
    shape: tuple[int, int]
    transposed: bool
    bias: str | None
    bias_node: str | None

    def to_json(self) -> dict:
        return {
            "node": self.node,
            "weight": self.weight,
            "shape": list(self.shape),
            "transposed": self.transposed,
            "bias": self.bias,
            "bias_node": self.bias_node,
        }


@dataclass
class Linear:
    """A MatMul/Gemm node with a constant 2-D weight, and its optional bias."""

    node: ir.Node
    weight: ir.Value
    weight_path: tuple[ir.Node, ...]
    transposed: bool
    bias: ir.Value | None
    bias_node: ir.Node | None

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def output(self) -> ir.Value:
        """The layer's result, after the bias when the bias is a separate Add."""
        return (self.bias_node or self.node).outputs[0]

    @property
    def in_features(self) -> int:
        shape = self.weight.shape
        return int(shape[0] if not self.transposed else shape[1])

    @property
    def out_features(self) -> int:
        shape = self.weight.shape
        return int(shape[1] if not self.transposed else shape[0])

    @property
    def parameter_count(self) -> int:
        bias = 0 if self.bias is None else self.out_features
        return self.in_features * self.out_features + bias

    @property
    def consumed_weight(self) -> ir.Value:
        """The value the node reads as its weight (the end of the Transpose/Cast chain)."""
        return self.node.inputs[1]

    def read_weight(self) -> np.ndarray:
        """The weight as float32 ``[in_features, out_features]``."""
        stored = self.weight.const_value.numpy()
        return np.ascontiguousarray((stored.T if self.transposed else stored).astype(np.float32))

    def read_bias(self) -> np.ndarray | None:
        data = constant_array(self.bias)
        return None if data is None else data.reshape(-1).astype(np.float32)

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
