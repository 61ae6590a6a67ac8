"""Checks on a v2 inference request's tensors that must run before anything is allocated.

A request declares each input's shape apart from its data, and servers size buffers from the
declared shape: Triton 2.51's HTTP front allocates ``prod(shape) * itemsize`` bytes before it
reads the data (a declared ``[65536, 65536]`` aborts it, ``[2^31, 2^31]`` overflows and
segfaults it), and its element count wraps at 2^64, so ``[8, 2^61]`` with no data passes its
byte-size check and kills the Python stub, whose numpy cannot hold that shape. So a shape is
checked here first, in Python integers (which do not wrap): every dimension at least 1, at most
``max_elements`` elements, and exactly that many values or bytes behind it. KServe's model and
the front ``layerfuse serve`` puts before tritonserver both use these checks, so both engines
refuse the same requests with the same words.
"""

from __future__ import annotations

__all__ = [
    "ITEM_SIZES",
    "RequestError",
    "check_binary_size",
    "check_json_data",
    "check_shape",
    "check_shared_dims",
]

import math
from collections.abc import Mapping, Sequence

# Bytes per element of each fixed-size v2 datatype (BYTES has no fixed size).
ITEM_SIZES = {
    "BOOL": 1, "UINT8": 1, "INT8": 1, "UINT16": 2, "INT16": 2, "FP16": 2, "BF16": 2,
    "UINT32": 4, "INT32": 4, "FP32": 4, "UINT64": 8, "INT64": 8, "FP64": 8,
}  # fmt: skip


class RequestError(ValueError):
    """A request the server refuses with the protocol's error (HTTP 400, INVALID_ARGUMENT)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_shape(name: str, shape: object, max_elements: int = 0) -> int:
    """The element count of a declared shape, or a RequestError naming the input."""
    if not isinstance(shape, Sequence) or isinstance(shape, str | bytes):
        raise RequestError(f"input '{name}': shape must be a list of integers")
    dims = list(shape)
    if not all(_is_int(dim) for dim in dims):
        raise RequestError(f"input '{name}': shape {dims} must hold integers only")
    if any(dim < 1 for dim in dims):
        raise RequestError(f"input '{name}' has shape {dims}: every dimension must be at least 1")
    count = math.prod(dims)
    if max_elements and count > max_elements:
        raise RequestError(f"input '{name}' has {count} elements, the limit is {max_elements}")
    return count


def _value_fits(datatype: str, value: object) -> bool:
    if datatype == "BOOL":
        return isinstance(value, bool)
    if datatype == "BYTES":
        return isinstance(value, str)
    if datatype.startswith(("FP", "BF")):
        return isinstance(value, int | float) and not isinstance(value, bool)
    return _is_int(value)


def check_json_data(name: str, datatype: str, data: object, count: int) -> None:
    """JSON ``data`` (flat or nested lists) must hold ``count`` values of ``datatype``'s kind:
    a float for an integer input would otherwise be truncated without a word."""
    stack, seen = [data], 0
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
            continue
        if not _value_fits(datatype, item):
            raise RequestError(
                f"input '{name}' is {datatype} but its data holds {_json_kind(item)} {item!r:.40}"
            )
        seen += 1
        if seen > count:
            break
    if seen != count:
        raise RequestError(
            f"input '{name}': its shape needs {count} values, its data holds "
            f"{'more' if seen > count else seen}"
        )


def _json_kind(value: object) -> str:
    """How JSON would name the type of ``value`` (for error messages)."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number" if isinstance(value, float) else "an integer"
    if isinstance(value, str):
        return "a string"
    return "null" if value is None else "an object"


def check_binary_size(name: str, datatype: str, size: int, count: int) -> None:
    """Binary data must be exactly ``count`` elements of ``datatype`` (BYTES is not fixed)."""
    if datatype not in ITEM_SIZES:
        if datatype != "BYTES":
            raise RequestError(f"input '{name}' has unknown datatype {datatype}")
        return
    expected = count * ITEM_SIZES[datatype]
    if size != expected:
        raise RequestError(
            f"input '{name}': its shape needs {expected} bytes of {datatype}, it carries {size}"
        )


def check_shared_dims(
    shapes: Mapping[str, Sequence[int]], symbols: Mapping[str, Sequence[object]]
) -> None:
    """Inputs whose graph names one dimension alike (``batch``, ``sequence``) must agree on
    it: onnxruntime would broadcast a [1, 8] ids against a [2, 8] mask and answer 200."""
    seen: dict[str, tuple[str, int]] = {}
    for name, shape in shapes.items():
        for symbol, size in zip(symbols.get(name, ()), shape, strict=False):
            if not isinstance(symbol, str) or not symbol:
                continue
            first = seen.setdefault(symbol, (name, size))
            if first[1] != size:
                raise RequestError(
                    f"input '{name}' has {symbol} = {size}, input '{first[0]}' has {first[1]}"
                )
