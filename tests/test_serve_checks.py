"""The request checks both serving engines run before anything is allocated, without a server:
the encodings a live test does not reach (binary HTTP tensors, compressed bodies, nested and
typed JSON data, gRPC typed contents)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from layerfuse.deploy.request_checks import check_grpc_request, check_http_request, decode_body
from layerfuse.deploy.tensor_checks import RequestError, check_json_data, check_shape

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
from tritonclient.grpc import service_pb2  # noqa: E402


def _binary_body(shape: list[int], payload: bytes, declared: int) -> tuple[bytes, str]:
    header = {
        "inputs": [
            {
                "name": "input_ids",
                "shape": shape,
                "datatype": "INT64",
                "parameters": {"binary_data_size": declared},
            }
        ]
    }
    text = json.dumps(header).encode()
    return text + payload, str(len(text))


def test_binary_http_tensors_must_carry_exactly_their_shape():
    payload = np.arange(8, dtype=np.int64).tobytes()
    check_http_request(*_binary_body([1, 8], payload, 64), max_elements=100)
    with pytest.raises(RequestError, match=r"shape \[1, 0\]: every dimension must be at least 1"):
        check_http_request(*_binary_body([1, 0], b"", 0), max_elements=100)
    with pytest.raises(RequestError, match=r"its shape needs 128 bytes of INT64, it carries 64"):
        check_http_request(*_binary_body([2, 8], payload, 64), max_elements=100)
    with pytest.raises(RequestError, match=r"declare 64 bytes of binary data, the body carries 8"):
        check_http_request(*_binary_body([1, 8], payload[:8], 64), max_elements=100)
    with pytest.raises(RequestError, match=r"18446744073709551616 elements, the limit is 100"):
        check_http_request(*_binary_body([8, 2**61], b"", 0), max_elements=100)


def test_json_data_is_counted_through_nesting_and_checked_for_its_kind():
    check_json_data("ids", "INT64", [[1, 2], [3, 4]], 4)
    check_json_data("x", "FP32", [1, 2.5], 2)
    check_json_data("flag", "BOOL", [True, False], 2)
    with pytest.raises(RequestError, match=r"input 'ids' is INT64 but its data holds a number 2.5"):
        check_json_data("ids", "INT64", [[1, 2.5]], 2)
    with pytest.raises(RequestError, match=r"input 'ids' is INT64 but its data holds a boolean"):
        check_json_data("ids", "INT64", [True], 1)
    with pytest.raises(
        RequestError, match=r"input 'ids': its shape needs 3 values, its data holds 2"
    ):
        check_json_data("ids", "INT64", [[1], [2]], 3)
    with pytest.raises(RequestError, match=r"its shape needs 1 values, its data holds more"):
        check_json_data("ids", "INT64", list(range(10**5)), 1)


def test_shapes_must_be_lists_of_positive_integers():
    assert check_shape("ids", [2, 8], 16) == 16
    for shape, message in [
        ("1x8", r"shape must be a list of integers"),
        ([1.0, 8], r"must hold integers only"),
        ([True, 8], r"must hold integers only"),
        ([-1, 8], r"every dimension must be at least 1"),
        ([3, 8], r"has 24 elements, the limit is 16"),
    ]:
        with pytest.raises(RequestError, match=message):
            check_shape("ids", shape, 16)


def test_a_compressed_body_may_not_inflate_past_the_body_limit():
    body = json.dumps({"inputs": []}).encode()
    assert decode_body(gzip.compress(body), "gzip", 1000) == body
    with pytest.raises(RequestError, match=r"the inflated request body exceeds 1000 bytes"):
        decode_body(gzip.compress(b" " * 10**6), "gzip", 1000)
    with pytest.raises(RequestError, match=r"malformed gzip body"):
        decode_body(b"not gzip", "gzip", 1000)
    with pytest.raises(RequestError, match=r"Content-Encoding 'br' is not supported"):
        decode_body(body, "br", 1000)


def test_grpc_typed_contents_and_raw_contents_must_fill_the_shape():
    request = service_pb2.ModelInferRequest(model_name="tiny")
    tensor = request.inputs.add(name="input_ids", datatype="INT64", shape=[1, 3])
    tensor.contents.int64_contents.extend([1, 2, 3])
    check_grpc_request(request.SerializeToString(), max_elements=100)
    tensor.contents.int64_contents.pop()
    with pytest.raises(RequestError, match=r"'input_ids': its shape needs 3 values, its contents"):
        check_grpc_request(request.SerializeToString(), max_elements=100)
    raw = service_pb2.ModelInferRequest(model_name="tiny")
    raw.inputs.add(name="input_ids", datatype="INT64", shape=[8, 2**61])
    raw.raw_input_contents.append(b"")
    with pytest.raises(RequestError, match=r"input 'input_ids' has 18446744073709551616 elements"):
        check_grpc_request(raw.SerializeToString(), max_elements=100)
    with pytest.raises(RequestError, match=r"malformed ModelInferRequest"):
        check_grpc_request(b"\xff\xff\xff", max_elements=100)
