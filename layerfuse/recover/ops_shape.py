"""Torch implementations of ONNX's shape, indexing and data-movement ops.

Shape arithmetic (``Shape`` -> ``Gather`` -> ``Concat`` -> ``Reshape``) runs on int64
tensors exactly as onnxruntime runs it, so a graph exported with dynamic batch and sequence
axes keeps them. The ONNX rules that differ from torch's are spelled out here: ``Reshape``'s
0 (copy the input's dimension) and -1, ``Slice``'s clamping and negative steps, negative
``Gather`` indices, ``Expand``'s two-way broadcast, ``Split``'s ``num_outputs``.
"""

from __future__ import annotations

__all__ = ["SHAPE_OPS", "torch_dtype"]

from collections.abc import Callable

import torch
import torch.nn.functional as F

Op = Callable[[list, dict], object]

_DTYPES = {
    1: torch.float32,
    2: torch.uint8,
    3: torch.int8,
    4: torch.uint16,
    5: torch.int16,
    6: torch.int32,
    7: torch.int64,
    9: torch.bool,
    10: torch.float16,
    11: torch.float64,
    12: torch.uint32,
    13: torch.uint64,
    16: torch.bfloat16,
}


def torch_dtype(onnx_type: int) -> torch.dtype:
    if onnx_type not in _DTYPES:
        raise NotImplementedError(f"ONNX data type {onnx_type}")
    return _DTYPES[onnx_type]


def _ints(tensor: torch.Tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _cast(inputs: list, attrs: dict) -> torch.Tensor:
    return inputs[0].to(torch_dtype(attrs["to"]))


def _shape(inputs: list, attrs: dict) -> torch.Tensor:
    dims = list(inputs[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(dims))
    return torch.tensor(dims[start:end], dtype=torch.int64, device=inputs[0].device)


def _reshape(inputs: list, attrs: dict) -> torch.Tensor:
    x, shape = inputs[0], _ints(inputs[1])
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


def _flatten(inputs: list, attrs: dict) -> torch.Tensor:
    x = inputs[0]
    axis = attrs.get("axis", 1) % (x.dim() + 1) if x.dim() else 0
    outer = 1
    for dim in x.shape[:axis]:
        outer *= dim
    return x.reshape(outer, -1)


def _axes_input(inputs: list, attrs: dict) -> list[int] | None:
    if len(inputs) > 1 and inputs[1] is not None:
        return _ints(inputs[1])
    return attrs.get("axes")


def _squeeze(inputs: list, attrs: dict) -> torch.Tensor:
    x, axes = inputs[0], _axes_input(inputs, attrs)
    if axes is None:
        return x.squeeze()
    return x.squeeze(tuple(a % x.dim() for a in axes))


def _unsqueeze(inputs: list, attrs: dict) -> torch.Tensor:
    x, axes = inputs[0], _axes_input(inputs, attrs)
    rank = x.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        x = x.unsqueeze(axis)
    return x


def _transpose(inputs: list, attrs: dict) -> torch.Tensor:
    x = inputs[0]
    perm = attrs.get("perm", list(reversed(range(x.dim()))))
    return x.permute(perm)


def _concat(inputs: list, attrs: dict) -> torch.Tensor:
    return torch.cat([t for t in inputs if t is not None], dim=attrs["axis"])


def _split(inputs: list, attrs: dict) -> tuple:
    x, axis = inputs[0], attrs.get("axis", 0)
    if len(inputs) > 1 and inputs[1] is not None:
        sizes = _ints(inputs[1])
    elif "split" in attrs:
        sizes = attrs["split"]
    else:
        parts = attrs["num_outputs"]
        size = -(-x.shape[axis] // parts)
        sizes = [min(size, x.shape[axis] - i * size) for i in range(parts)]
    return tuple(torch.split(x, sizes, dim=axis))


def _slice_bounds(start: int, end: int, step: int, dim: int) -> tuple[int, int]:
    """ONNX Slice clamping: negative bounds count from the end, then clamp to the axis."""
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        return min(max(start, 0), dim), min(max(end, 0), dim)
    return min(max(start, -1), dim - 1), min(max(end, -1), dim - 1)


def _slice(inputs: list, attrs: dict) -> torch.Tensor:
    x = inputs[0]
    starts, ends = _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else range(len(starts))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    for start, end, raw_axis, step in zip(starts, ends, axes, steps, strict=True):
        axis = raw_axis % x.dim()
        begin, stop = _slice_bounds(start, end, step, x.shape[axis])
        if step > 0:
            index = [slice(None)] * axis + [slice(begin, stop, step)]
            x = x[tuple(index)]
        else:
            positions = torch.arange(begin, stop, step, device=x.device)
            x = x.index_select(axis, positions)
    return x


def _gather(inputs: list, attrs: dict) -> torch.Tensor:
    data, indices = inputs
    axis = attrs.get("axis", 0) % data.dim()
    size = data.shape[axis]
    flat = torch.remainder(indices.reshape(-1).long(), size)
    picked = data.index_select(axis, flat)
    shape = list(data.shape[:axis]) + list(indices.shape) + list(data.shape[axis + 1 :])
    return picked.reshape(shape)


def _gather_elements(inputs: list, attrs: dict) -> torch.Tensor:
    data, indices = inputs
    axis = attrs.get("axis", 0) % data.dim()
    return torch.gather(data, axis, torch.remainder(indices.long(), data.shape[axis]))


def _nd_index(data: torch.Tensor, indices: torch.Tensor, batch_dims: int) -> tuple:
    """Advanced-indexing tuple for GatherND/ScatterND with ``batch_dims`` leading batch axes."""
    depth = indices.shape[-1]
    sizes = torch.tensor(
        data.shape[batch_dims : batch_dims + depth], device=indices.device, dtype=torch.long
    )
    indices = torch.remainder(indices.long(), sizes)
    batch = []
    for axis in range(batch_dims):
        shape = [1] * (indices.dim() - 1)
        shape[axis] = data.shape[axis]
        batch.append(torch.arange(data.shape[axis], device=indices.device).reshape(shape))
    return (*batch, *indices.unbind(-1))


def _gather_nd(inputs: list, attrs: dict) -> torch.Tensor:
    data, indices = inputs
    return data[_nd_index(data, indices, attrs.get("batch_dims", 0))]


def _scatter_nd(inputs: list, attrs: dict) -> torch.Tensor:
    data, indices, updates = inputs
    if attrs.get("reduction", "none") != "none":
        raise NotImplementedError("ScatterND with a reduction")
    return data.index_put(_nd_index(data, indices, 0), updates)


def _expand(inputs: list, attrs: dict) -> torch.Tensor:
    x = inputs[0]
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(inputs[1]))))


def _tile(inputs: list, attrs: dict) -> torch.Tensor:
    return inputs[0].repeat(_ints(inputs[1]))


def _where(inputs: list, attrs: dict) -> torch.Tensor:
    return torch.where(inputs[0].bool(), inputs[1], inputs[2])


def _range(inputs: list, attrs: dict) -> torch.Tensor:
    start, limit, delta = inputs
    return torch.arange(
        start.item(), limit.item(), delta.item(), dtype=start.dtype, device=start.device
    )


def _constant_of_shape(inputs: list, attrs: dict) -> torch.Tensor:
    value = attrs.get("value")
    shape = _ints(inputs[0])
    if value is None:
        return torch.zeros(shape, dtype=torch.float32, device=inputs[0].device)
    fill = value.reshape(-1)[0].item()
    return torch.full(shape, fill, dtype=value.dtype, device=inputs[0].device)


def _trilu(inputs: list, attrs: dict) -> torch.Tensor:
    k = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    return torch.triu(inputs[0], k) if attrs.get("upper", 1) else torch.tril(inputs[0], k)


def _cumsum(inputs: list, attrs: dict) -> torch.Tensor:
    x, axis = inputs[0], int(inputs[1].item())
    if attrs.get("reverse", 0):
        x = x.flip(axis)
    result = torch.cumsum(x, axis).to(x.dtype)
    if attrs.get("exclusive", 0):
        result = result - x
    return result.flip(axis) if attrs.get("reverse", 0) else result


def _pad(inputs: list, attrs: dict) -> torch.Tensor:
    x, pads = inputs[0], _ints(inputs[1])
    value = inputs[2].item() if len(inputs) > 2 and inputs[2] is not None else 0.0
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else range(x.dim())
    axes = [a % x.dim() for a in axes]
    count = len(axes)
    widths = [0] * (2 * x.dim())
    for i, axis in enumerate(axes):
        # torch.nn.functional.pad lists (begin, end) pairs from the last axis backwards.
        slot = 2 * (x.dim() - 1 - axis)
        widths[slot], widths[slot + 1] = pads[i], pads[i + count]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[
        attrs.get("mode", "constant")
    ]
    return F.pad(x, widths, mode=mode, value=value if mode == "constant" else None)


def _argmax(inputs: list, attrs: dict) -> torch.Tensor:
    return torch.argmax(inputs[0], dim=attrs.get("axis", 0), keepdim=bool(attrs.get("keepdims", 1)))


SHAPE_OPS: dict[str, Op] = {
    "Cast": _cast,
    "CastLike": lambda inputs, attrs: inputs[0].to(inputs[1].dtype),
    "Identity": lambda inputs, attrs: inputs[0],
    "Shape": _shape,
    "Size": lambda inputs, attrs: torch.tensor(
        inputs[0].numel(), dtype=torch.int64, device=inputs[0].device
    ),
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Transpose": _transpose,
    "Concat": _concat,
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherElements": _gather_elements,
    "GatherND": _gather_nd,
    "ScatterND": _scatter_nd,
    "Expand": _expand,
    "Tile": _tile,
    "Where": _where,
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
    "Trilu": _trilu,
    "CumSum": _cumsum,
    "Pad": _pad,
    "ArgMax": _argmax,
}
