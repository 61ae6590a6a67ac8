"""Torch implementations of ONNX's arithmetic, activation, reduction, norm and linear ops.

Each function takes the node's inputs (``None`` for an omitted optional input) and its
attributes as plain Python values, and follows the ONNX operator's definition at opset 18
(numpy broadcasting, integer ``Div`` truncating toward zero, ``Reduce*`` axes given as an
input or, in older graphs, as an attribute). The interpreter's equivalence tests compare every
family's graph against onnxruntime within 1e-4, so these must be the operators' semantics, not
approximations of them.
"""

from __future__ import annotations

__all__ = ["MATH_OPS"]

from collections.abc import Callable

import torch
import torch.nn.functional as F

Op = Callable[[list, dict], object]


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Op:
    return lambda inputs, attrs: fn(inputs[0])


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    return lambda inputs, attrs: fn(inputs[0], inputs[1])


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Op:
    def run(inputs: list, attrs: dict) -> torch.Tensor:
        result = inputs[0]
        for other in inputs[1:]:
            result = fn(result, other)
        return result

    return run


def _div(inputs: list, attrs: dict) -> torch.Tensor:
    a, b = inputs
    if a.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _mod(inputs: list, attrs: dict) -> torch.Tensor:
    a, b = inputs
    return torch.fmod(a, b) if attrs.get("fmod", 0) else torch.remainder(a, b)


def _pow(inputs: list, attrs: dict) -> torch.Tensor:
    base, exponent = inputs
    if base.is_floating_point():
        exponent = exponent.to(base.dtype)
    return torch.pow(base, exponent).to(base.dtype)


def _clip(inputs: list, attrs: dict) -> torch.Tensor:
    x = inputs[0]
    low = inputs[1] if len(inputs) > 1 else None
    high = inputs[2] if len(inputs) > 2 else None
    if low is None and "min" in attrs:
        low = torch.tensor(attrs["min"], dtype=x.dtype, device=x.device)
    if high is None and "max" in attrs:
        high = torch.tensor(attrs["max"], dtype=x.dtype, device=x.device)
    return torch.clamp(x, min=low, max=high)


def _gelu(inputs: list, attrs: dict) -> torch.Tensor:
    return F.gelu(inputs[0], approximate=attrs.get("approximate", "none"))


def _softmax(fn: Callable) -> Op:
    return lambda inputs, attrs: fn(inputs[0], dim=attrs.get("axis", -1))


def _axes(inputs: list, attrs: dict) -> list[int] | None:
    """Reduction axes: the second input (opset 13/18) or the ``axes`` attribute (older)."""
    if len(inputs) > 1 and inputs[1] is not None:
        return [int(a) for a in inputs[1].reshape(-1).tolist()]
    return attrs.get("axes")


def _reduce(kind: str) -> Op:
    def run(inputs: list, attrs: dict) -> torch.Tensor:
        x = inputs[0]
        keep = bool(attrs.get("keepdims", 1))
        axes = _axes(inputs, attrs)
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(x.dim()))
        axes = sorted(a % x.dim() for a in axes) if x.dim() else []
        if kind == "mean":
            return x.mean(dim=axes, keepdim=keep)
        if kind == "sum":
            return x.sum(dim=axes, keepdim=keep)
        if kind == "l2":
            return x.square().sum(dim=axes, keepdim=keep).sqrt()
        result = x
        for axis in reversed(axes):
            result = getattr(result, "amax" if kind == "max" else "amin")(dim=axis, keepdim=keep)
        return result

    return run


def _layer_norm(inputs: list, attrs: dict) -> torch.Tensor:
    x, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = attrs.get("axis", -1) % x.dim()
    shape = tuple(x.shape[axis:])
    epsilon = attrs.get("epsilon", 1e-5)
    if tuple(scale.shape) == shape and (bias is None or tuple(bias.shape) == shape):
        return F.layer_norm(x, shape, scale, bias, epsilon)
    normed = F.layer_norm(x, shape, None, None, epsilon) * scale
    return normed if bias is None else normed + bias


def _rms_norm(inputs: list, attrs: dict) -> torch.Tensor:
    x, scale = inputs[0], inputs[1]
    axis = attrs.get("axis", -1) % x.dim()
    dims = list(range(axis, x.dim()))
    variance = x.square().mean(dim=dims, keepdim=True)
    return x * torch.rsqrt(variance + attrs.get("epsilon", 1e-5)) * scale


def _matmul(inputs: list, attrs: dict) -> torch.Tensor:
    return torch.matmul(inputs[0], inputs[1])


def _gemm(inputs: list, attrs: dict) -> torch.Tensor:
    a, b = inputs[0], inputs[1]
    c = inputs[2] if len(inputs) > 2 else None
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    result = a @ b
    if attrs.get("alpha", 1.0) != 1.0:
        result = attrs["alpha"] * result
    if c is not None:
        result = result + (c if attrs.get("beta", 1.0) == 1.0 else attrs["beta"] * c)
    return result


def _conv_padding(attrs: dict, spatial: int) -> tuple[list[int], list[int]]:
    pads = attrs.get("pads", [0] * (2 * spatial))
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise NotImplementedError("Conv with auto_pad SAME_* padding")
    return list(pads[:spatial]), list(pads[spatial:])


def _conv(inputs: list, attrs: dict) -> torch.Tensor:
    x, weight = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    spatial = weight.dim() - 2
    begin, end = _conv_padding(attrs, spatial)
    fn = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[spatial]
    padding: list[int] | int = begin
    if begin != end:
        flat = [p for pair in zip(reversed(begin), reversed(end), strict=True) for p in pair]
        x, padding = F.pad(x, flat), 0
    return fn(
        x,
        weight,
        bias,
        stride=attrs.get("strides", [1] * spatial),
        padding=padding,
        dilation=attrs.get("dilations", [1] * spatial),
        groups=attrs.get("group", 1),
    )


def _einsum(inputs: list, attrs: dict) -> torch.Tensor:
    return torch.einsum(attrs["equation"], *inputs)


def _hard_sigmoid(inputs: list, attrs: dict) -> torch.Tensor:
    alpha, beta = attrs.get("alpha", 0.2), attrs.get("beta", 0.5)
    return torch.clamp(alpha * inputs[0] + beta, 0.0, 1.0)


def _leaky_relu(inputs: list, attrs: dict) -> torch.Tensor:
    return F.leaky_relu(inputs[0], attrs.get("alpha", 0.01))


def _elu(inputs: list, attrs: dict) -> torch.Tensor:
    return F.elu(inputs[0], attrs.get("alpha", 1.0))


def _dropout(inputs: list, attrs: dict) -> tuple:
    # Inference graphs: Dropout is the identity (its mask output is all true).
    x = inputs[0]
    return x, torch.ones_like(x, dtype=torch.bool)


MATH_OPS: dict[str, Op] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Mod": _mod,
    "Pow": _pow,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sign": _unary(torch.sign),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil),
    "Round": _unary(torch.round),
    "Erf": _unary(torch.erf),
    "Sin": _unary(torch.sin),
    "Cos": _unary(torch.cos),
    "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid),
    "Relu": _unary(torch.relu),
    "Softplus": _unary(F.softplus),
    "Softsign": _unary(F.softsign),
    "Mish": _unary(F.mish),
    "HardSigmoid": _hard_sigmoid,
    "LeakyRelu": _leaky_relu,
    "Elu": _elu,
    "Gelu": _gelu,
    "Clip": _clip,
    "Softmax": _softmax(torch.softmax),
    "LogSoftmax": _softmax(torch.log_softmax),
    "ReduceMean": _reduce("mean"),
    "ReduceSum": _reduce("sum"),
    "ReduceMax": _reduce("max"),
    "ReduceMin": _reduce("min"),
    "ReduceL2": _reduce("l2"),
    "LayerNormalization": _layer_norm,
    "RMSNormalization": _rms_norm,
    "SimplifiedLayerNormalization": _rms_norm,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Conv": _conv,
    "Einsum": _einsum,
    "Dropout": _dropout,
    "IsNaN": _unary(torch.isnan),
    "IsInf": _unary(torch.isinf),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor),
    "Not": _unary(torch.logical_not),
}
