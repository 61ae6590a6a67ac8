"""Whole v2 inference requests (an HTTP body, a gRPC ``ModelInferRequest``) checked before a
server sees them: what :mod:`layerfuse.deploy.tensor_checks` checks per tensor, applied to the
protocol's two encodings. Used by the front that ``layerfuse serve`` puts before tritonserver.
"""

from __future__ import annotations

__all__ = ["check_grpc_request", "check_http_request", "decode_body"]

import json
import zlib

from layerfuse.deploy.tensor_checks import (
    ITEM_SIZES,
    RequestError,
    check_binary_size,
    check_json_data,
    check_shape,
)

# gRPC's typed contents field for each datatype (FP16 and BF16 travel as raw bytes only).
_CONTENTS = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents",
}  # fmt: skip


def _datatype(name: str, datatype: object) -> str:
    if datatype not in ITEM_SIZES and datatype != "BYTES":
        raise RequestError(f"input '{name}' has unknown datatype {datatype!r:.40}")
    return datatype


def decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before ``Content-Encoding`` (gzip or deflate), at most ``limit`` bytes
    once inflated, so a small compressed body cannot expand without bound."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise RequestError(f"Content-Encoding {encoding!r:.40} is not supported")
    inflater = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib header, detected
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise RequestError(f"malformed {encoding} body: {exc}") from None
    if len(plain) > limit:
        raise RequestError(f"the inflated request body exceeds {limit} bytes")
    return plain


def check_http_request(body: bytes, header_length: str | None, max_elements: int) -> None:
    """A REST infer body: JSON header (optionally followed by binary tensors), each input's
    shape, values or byte count, and the binary part's total length."""
    try:
        size = len(body) if header_length is None else int(header_length)
    except ValueError:
        raise RequestError("Inference-Header-Content-Length must be an integer") from None
    if not 0 <= size <= len(body):
        raise RequestError(f"Inference-Header-Content-Length {size} exceeds the body")
    try:
        header = json.loads(body[:size])
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed request: {exc}") from None
    inputs = header.get("inputs") if isinstance(header, dict) else None
    if not isinstance(inputs, list) or not inputs:
        raise RequestError("malformed request: 'inputs' must be a non-empty list")
    binary = 0
    for entry in inputs:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise RequestError("malformed request: every input needs a 'name'")
        name = entry["name"]
        datatype = _datatype(name, entry.get("datatype"))
        count = check_shape(name, entry.get("shape"), max_elements)
        parameters = entry.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise RequestError(f"input '{name}': parameters must be an object")
        carried = parameters.get("binary_data_size", parameters.get("shared_memory_byte_size"))
        if carried is not None:
            if not isinstance(carried, int) or isinstance(carried, bool) or carried < 0:
                raise RequestError(f"input '{name}': its byte size must be a whole number")
            check_binary_size(name, datatype, carried, count)
            binary += carried if "binary_data_size" in parameters else 0
        elif "data" in entry:
            check_json_data(name, datatype, entry["data"], count)
        else:
            raise RequestError(f"input '{name}' has no data")
    if binary != len(body) - size:
        raise RequestError(
            f"the inputs declare {binary} bytes of binary data, the body carries {len(body) - size}"
        )


def check_grpc_request(raw: bytes, max_elements: int) -> None:
    """A serialized ``ModelInferRequest``: each input's shape and its raw bytes or typed values."""
    from google.protobuf.message import DecodeError
    from tritonclient.grpc import service_pb2

    try:
        request = service_pb2.ModelInferRequest.FromString(raw)
    except DecodeError as exc:
        raise RequestError(f"malformed ModelInferRequest: {exc}") from None
    raw_contents = request.raw_input_contents
    if raw_contents and len(raw_contents) != len(request.inputs):
        raise RequestError(
            f"{len(request.inputs)} inputs but {len(raw_contents)} raw_input_contents"
        )
    for index, tensor in enumerate(request.inputs):
        datatype = _datatype(tensor.name, tensor.datatype)
        count = check_shape(tensor.name, list(tensor.shape), max_elements)
        if "shared_memory_byte_size" in tensor.parameters:
            carried = tensor.parameters["shared_memory_byte_size"].int64_param
            check_binary_size(tensor.name, datatype, carried, count)
        elif raw_contents:
            check_binary_size(tensor.name, datatype, len(raw_contents[index]), count)
        else:
            field = _CONTENTS.get(datatype)
            values = len(getattr(tensor.contents, field)) if field else 0
            if values != count:
                raise RequestError(
                    f"input '{tensor.name}': its shape needs {count} values, its contents "
                    f"hold {values}"
                )
