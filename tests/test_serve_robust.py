"""Requests that used to crash or fool a server, and processes killed mid-way: issue 19.

One server per engine serves a hand-built tiny graph (``logits = emb[input_ids] * mask``, so
exact outputs are a numpy one-liner). Every bad request must get the protocol's error naming
the input, and the server must still be serving, and ready, with exact outputs afterwards.
Triton's Python stub killed mid-way makes the model not ready until it is reloaded.
``layerfuse serve`` itself killed or stopped mid-way: ``test_serve_processes.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from layerfuse.deploy.process import free_port
from layerfuse.deploy.serve import ServeOptions, start_server
from tests.engines import require_engine

grpcclient = pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

EMB = (np.arange(40, dtype=np.float32).reshape(10, 4) - 20) / 8
IDS = np.array([[1, 2, 3, 4, 5, 6, 7, 8]], np.int64)
MASK = np.array([[1, 1, 1, 1, 1, 1, 0, 0]], np.int64)
MAX_ELEMENTS = 4096
HUGE = {
    "[2^31, 2^31]": [2**31, 2**31],
    "[65536, 65536]": [65536, 65536],
    "[2^33, 1]": [2**33, 1],
    "[1, 2^40]": [1, 2**40],
    "[1, 2^31]": [1, 2**31],
    "[8, 2^61]": [8, 2**61],
}


def _tiny_graph(path: Path) -> Path:
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["rows"]),
        helper.make_node("Cast", ["attention_mask"], ["weights"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["weights", "last"], ["weights3"]),
        helper.make_node("Mul", ["rows", "weights3"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info(name, TensorProto.INT64, ["batch", "sequence"])
        for name in ("input_ids", "attention_mask")
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", 4])]
    weights = [
        helper.make_tensor("emb", TensorProto.FLOAT, EMB.shape, EMB.ravel()),
        helper.make_tensor("last", TensorProto.INT64, (1,), [-1]),
    ]
    graph = helper.make_graph(nodes, "tiny", inputs, outputs, weights)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    onnx.save(model, path)
    return path


def _expected(ids=IDS, mask=MASK) -> np.ndarray:
    return EMB[ids] * mask[..., None].astype(np.float32)


@pytest.fixture(scope="module")
def tiny_graph(tmp_path_factory) -> Path:
    return _tiny_graph(tmp_path_factory.mktemp("tiny") / "tiny.onnx")


@pytest.fixture(scope="module", params=["triton", "kserve"])
def server(request, tiny_graph, tmp_path_factory):
    require_engine(request.param)
    log = (tmp_path_factory.mktemp("logs") / f"{request.param}.log").open("w")
    options = ServeOptions(
        engine=request.param,
        http_port=free_port(),
        grpc_port=free_port(),
        max_input_elements=MAX_ELEMENTS,
        max_body_bytes=1 << 20,
        grace_seconds=5,
    )
    running = start_server([f"tiny={tiny_graph}"], options, log)
    yield running
    assert running.stop() == 0, "the server did not shut down cleanly"
    log.close()


def _post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _tensor(name: str, shape, data, datatype: str = "INT64") -> dict:
    return {"name": name, "shape": shape, "datatype": datatype, "data": data}


def _good_body() -> bytes:
    inputs = [
        _tensor("input_ids", list(IDS.shape), IDS.ravel().tolist()),
        _tensor("attention_mask", list(MASK.shape), MASK.ravel().tolist()),
    ]
    return json.dumps({"inputs": inputs}).encode()


def _grpc_input(name: str, array: np.ndarray, shape=None):
    tensor = grpcclient.InferInput(name, list(array.shape), "INT64")
    tensor.set_data_from_numpy(array)
    if shape is not None:
        tensor.set_shape(shape)  # declared apart from the data, as a hostile client may
    return tensor


def _assert_serving_and_ready(server, after: str) -> None:
    """Ready over both protocols, and a good request gives exact outputs over both."""
    assert _get(f"{server.http_url}/v2/health/ready") == 200, after
    assert _get(f"{server.http_url}/v2/models/tiny/ready") == 200, after
    status, text = _post(f"{server.http_url}/v2/models/tiny/infer", _good_body())
    assert status == 200, (after, text)
    output = json.loads(text)["outputs"][0]
    assert output["shape"] == [1, 8, 4], after
    assert np.array_equal(np.array(output["data"], np.float32).reshape(1, 8, 4), _expected())
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        assert client.is_server_ready() and client.is_model_ready("tiny"), after
        result = client.infer(
            "tiny", [_grpc_input("input_ids", IDS), _grpc_input("attention_mask", MASK)]
        )
        assert np.array_equal(result.as_numpy("logits"), _expected()), after
    finally:
        client.close()


def _http_cases() -> dict[str, tuple[bytes, str]]:
    """label -> (body, the input the error must name; "" for a body with no input to name).
    Two inputs that disagree on the batch may be named by either (Triton names the first)."""
    eight = [1] * 8
    mask = _tensor("attention_mask", [1, 8], eight)
    cases = {
        f"shape {label}": (
            json.dumps({"inputs": [_tensor("input_ids", shape, eight), mask]}).encode(),
            "input_ids",
        )
        for label, shape in HUGE.items()
    }
    both = [_tensor("input_ids", [8, 2**61], eight), _tensor("attention_mask", [8, 2**61], eight)]
    cases["[8, 2^61] on both inputs"] = (json.dumps({"inputs": both}).encode(), "input_ids")
    empty = [_tensor("input_ids", [1, 0], []), _tensor("attention_mask", [1, 0], [])]
    cases["shape [1, 0]"] = (json.dumps({"inputs": empty}).encode(), "input_ids")
    batch = [_tensor("input_ids", [1, 8], eight), _tensor("attention_mask", [2, 8], eight * 2)]
    cases["ids [1, 8] with mask [2, 8]"] = (json.dumps({"inputs": batch}).encode(), "_ids|_mask")
    sequence = [_tensor("input_ids", [1, 8], eight), _tensor("attention_mask", [1, 4], [1] * 4)]
    cases["ids [1, 8] with mask [1, 4]"] = (
        json.dumps({"inputs": sequence}).encode(),
        "attention_mask",
    )
    floats = [_tensor("input_ids", [1, 8], [1.7] * 8), mask]
    cases["float data for INT64"] = (json.dumps({"inputs": floats}).encode(), "input_ids")
    short = [_tensor("input_ids", [2, 8], eight), mask]
    cases["data short of its shape"] = (json.dumps({"inputs": short}).encode(), "input_ids")
    text_shape = [_tensor("input_ids", "1x8", eight), mask]
    cases["shape of the wrong JSON type"] = (
        json.dumps({"inputs": text_shape}).encode(),
        "input_ids",
    )
    cases["malformed JSON"] = (b'{"inputs": [ {"name": ', "")
    return cases


HTTP_CASES = _http_cases()


@pytest.mark.parametrize("label", list(HTTP_CASES))
def test_a_bad_http_request_is_400_naming_the_input_and_the_server_stays_ready(server, label):
    body, name = HTTP_CASES[label]
    status, text = _post(f"{server.http_url}/v2/models/tiny/infer", body)
    assert status == 400, (label, status, text)
    error = json.loads(text)["error"]
    if name == "_ids|_mask":
        assert "'input_ids'" in error or "'attention_mask'" in error, error
    elif name:
        assert f"'{name}'" in error, error
    _assert_serving_and_ready(server, f"after {label}")


GRPC_CASES = {
    "[8, 2^61] with no data": (np.zeros((1, 0), np.int64), [8, 2**61], "input_ids"),
    "[2^31, 2^31] with 8 values": (IDS, [2**31, 2**31], "input_ids"),
    "[1, 0]": (np.zeros((1, 0), np.int64), [1, 0], "input_ids"),
    "mask [1, 4] for ids [1, 8]": (np.ones((1, 4), np.int64), None, "attention_mask"),
}


@pytest.mark.parametrize("label", list(GRPC_CASES))
def test_a_bad_grpc_request_is_invalid_argument_naming_the_input(server, label):
    array, shape, name = GRPC_CASES[label]
    if name == "input_ids":
        inputs = [
            _grpc_input("input_ids", array, shape),
            _grpc_input("attention_mask", array, shape),
        ]
    else:
        inputs = [_grpc_input("input_ids", IDS), _grpc_input("attention_mask", array)]
    client = grpcclient.InferenceServerClient(server.grpc_address)
    try:
        with pytest.raises(InferenceServerException) as caught:
            client.infer("tiny", inputs)
    finally:
        client.close()
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value.message()
    assert f"'{name}'" in caught.value.message()
    _assert_serving_and_ready(server, f"after gRPC {label}")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _wait_for(condition, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _children(pid: int) -> list[int]:
    return [
        int(child)
        for listing in Path(f"/proc/{pid}/task").glob("*/children")
        for child in listing.read_text().split()
    ]


def test_a_dead_stub_is_not_ready_and_is_reloaded(server):
    if server.options.engine != "triton":
        pytest.skip("the Python stub is Triton's")
    stubs = [pid for pid in _children(server.process.pid) if _alive(pid)]
    assert stubs, "tritonserver has no Python stub"
    os.kill(stubs[0], signal.SIGKILL)
    _wait_for(lambda: not _alive(stubs[0]), "the stub to die", timeout=10)
    assert _get(f"{server.http_url}/v2/health/ready") == 503
    _wait_for(lambda: _get(f"{server.http_url}/v2/health/ready") == 200, "the reload")
    _assert_serving_and_ready(server, "after the stub was killed")
