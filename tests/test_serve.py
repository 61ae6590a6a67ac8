"""Real servers on loopback (the bundled tritonserver and KServe's ModelServer), probed with
the real tritonclient over HTTP and gRPC: metadata, numbers, bad requests, failed models,
shutdown.

Served per engine: the original, tied and fused tiny Llama deployed with ``layerfuse deploy
triton --backend python``, a model folder whose graph is corrupt, and the original once more
as a plain ``.onnx`` file (``direct``). Starting a server apart from these (a failed model
without ``keep_going``, the ``layerfuse serve`` command) is ``test_serve_start.py``.
"""

from __future__ import annotations

import concurrent.futures
import json
import urllib.error
import urllib.request

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.deploy.process import free_port
from layerfuse.deploy.serve import ServeOptions, start_server
from layerfuse.deploy.signature import graph_signature
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.runtime.session import create_session
from tests.engines import require_engine

httpclient = pytest.importorskip("tritonclient.http", reason="the serve extra is not installed")
grpcclient = pytest.importorskip("tritonclient.grpc", reason="the serve extra is not installed")
from tritonclient.utils import InferenceServerException  # noqa: E402

VARIANTS = ("original", "tied", "fused")
IDS = np.array([[5, 17, 42, 99, 3], [7, 8, 9, 10, 11]], np.int64)
MAX_ELEMENTS = 4096
MAX_BODY = 1 << 20


@pytest.fixture(scope="module")
def variants(tiny, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("variants")
    original = tiny.model("llama")
    graph = load_model(original)
    plans = {
        "tied": plan_merge(original, MergeRequest(ranges=[(1, 3)], method="vanilla")),
        "fused": FusePlan(
            fingerprint(graph), len(detect_structure(graph).blocks), [2, 3], [(1, 3)]
        ),
    }
    paths = {"original": original}
    for name, plan in plans.items():
        paths[name] = save_model(apply_plan(original, plan), root / name / "model.onnx")
        carry_manifest(original, paths[name])
    return paths


@pytest.fixture(scope="module")
def repo(variants, tmp_path_factory):
    """The variants deployed for the Python backend, plus ``broken`` (a truncated graph)."""
    repo = tmp_path_factory.mktemp("repo")
    for name, path in [*variants.items(), ("broken", variants["original"])]:
        code = main(
            ["deploy", "triton", str(path), "--repo", str(repo), "--name", name,
             "--backend", "python", "--max-input-elements", str(MAX_ELEMENTS)]
        )  # fmt: skip
        assert code == 0
    graph = repo / "broken" / "1" / "model.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    return repo


def _options(engine: str, **changes) -> ServeOptions:
    settings = dict(
        engine=engine,
        http_port=free_port(),
        grpc_port=free_port(),
        max_input_elements=MAX_ELEMENTS,
        max_body_bytes=MAX_BODY,
        grace_seconds=5,
        keep_going=True,
        provider="cpu",
    )
    return ServeOptions(**{**settings, **changes})


@pytest.fixture(scope="module", params=["triton", "kserve"])
def server(request, repo, variants, tmp_path_factory):
    require_engine(request.param)
    log = (tmp_path_factory.mktemp("logs") / f"{request.param}.log").open("w")
    running = start_server(
        [str(repo), f"direct={variants['original']}"], _options(request.param), log
    )
    yield running
    assert running.stop() == 0, "the server did not shut down cleanly"
    log.close()


@pytest.fixture
def clients(server):
    http = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
    grpc = grpcclient.InferenceServerClient(server.grpc_address)
    yield http, grpc
    http.close()  # an open keep-alive connection would hold up Triton's shutdown
    grpc.close()


def _inputs(client, ids=IDS, datatype="INT64", binary=True, names=("input_ids", "attention_mask")):
    tensors = []
    for name, array in zip(names, (ids, np.ones_like(ids)), strict=True):
        tensor = client.InferInput(name, list(array.shape), datatype)
        if client is httpclient:
            tensor.set_data_from_numpy(array, binary_data=binary)
        else:
            tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def _expected(path, ids=IDS):
    session = create_session(path, provider="cpu")
    return session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


def test_every_model_loads_and_the_broken_one_is_reported(server, clients):
    http, grpc = clients
    states = {model.name: model for model in server.models}
    assert sorted(states) == ["broken", "direct", "fused", "original", "tied"]
    assert all(states[name].ready for name in ("direct", *VARIANTS))
    assert not states["broken"].ready and states["broken"].reason
    assert http.is_server_live() and grpc.is_server_live() and grpc.is_server_ready()
    assert http.is_model_ready("tied") and grpc.is_model_ready("fused")
    assert not http.is_model_ready("broken") and not grpc.is_model_ready("broken")
    with pytest.raises(InferenceServerException):
        http.infer("broken", _inputs(httpclient))


def test_metadata_matches_the_graph(server, clients, variants):
    http, grpc = clients
    for name in (*VARIANTS, "direct"):
        signature = graph_signature(load_model(variants.get(name, variants["original"])))
        expected = {
            "inputs": [spec.to_json() for spec in signature.inputs],
            "outputs": [spec.to_json() for spec in signature.outputs],
        }
        over_http = http.get_model_metadata(name)
        over_grpc = grpc.get_model_metadata(name, as_json=True)
        for metadata in (over_http, over_grpc):
            got = {
                kind: [
                    {
                        "name": t["name"],
                        "datatype": t["datatype"],
                        "shape": [int(d) for d in t["shape"]],
                    }
                    for t in metadata[kind]
                ]
                for kind in ("inputs", "outputs")
            }
            assert got == expected, name


def test_inference_matches_a_direct_onnxruntime_run(server, clients, variants):
    http, grpc = clients
    expected = {name: _expected(path) for name, path in variants.items()}
    expected["direct"] = expected["original"]
    for name, logits in expected.items():
        results = {
            "http binary": http.infer(name, _inputs(httpclient)).as_numpy("logits"),
            "http json": http.infer(
                name,
                _inputs(httpclient, binary=False),
                outputs=[httpclient.InferRequestedOutput("logits", binary_data=False)],
            ).as_numpy("logits"),
            "grpc": grpc.infer(name, _inputs(grpcclient)).as_numpy("logits"),
        }
        for protocol, result in results.items():
            assert result.shape == logits.shape, (name, protocol)
            assert np.max(np.abs(result - logits)) <= 1e-5, (name, protocol)
    for name in ("tied", "fused"):
        assert np.max(np.abs(expected[name] - expected["original"])) > 1e-3, name


def test_concurrent_requests_each_get_their_own_numbers(server, variants):
    """Concurrent requests of one shape may be stacked into one batch (Triton's dynamic
    batcher); each must still get exactly its own rows back."""
    batches = [IDS + offset for offset in range(8)]
    expected = [_expected(variants["tied"], ids) for ids in batches]

    def call(ids):
        client = httpclient.InferenceServerClient(server.http_url.removeprefix("http://"))
        try:
            return client.infer("tied", _inputs(httpclient, ids)).as_numpy("logits")
        finally:
            client.close()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, batches))
    for result, logits in zip(results, expected, strict=True):
        assert np.max(np.abs(result - logits)) <= 1e-5


def _raw_post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _protocol_error(call) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def test_bad_requests_get_protocol_errors_and_the_server_keeps_serving(server, clients, variants):
    http, grpc = clients
    expected = _expected(variants["original"])
    big = np.zeros((1, MAX_BODY // 8 + 1024), np.int64)
    cases = {
        "rank 3": (lambda: http.infer("original", _inputs(httpclient, IDS[None])), "400", "shape"),
        "FP32 ids": (
            lambda: grpc.infer("original", _inputs(grpcclient, IDS.astype(np.float32), "FP32")),
            "StatusCode.INVALID_ARGUMENT",
            "FP32",
        ),
        "unknown model": (lambda: http.infer("nope", _inputs(httpclient)), "404", "nope"),
        "unknown model grpc": (
            lambda: grpc.infer("nope", _inputs(grpcclient)),
            "StatusCode.NOT_FOUND",
            "nope",
        ),
        "too many elements": (
            lambda: grpc.infer("original", _inputs(grpcclient, np.zeros((1, 5000), np.int64))),
            "StatusCode.INVALID_ARGUMENT",
            "limit",
        ),
        "oversized body": (
            lambda: http.infer("original", _inputs(httpclient, big)),
            "413",
            "exceeds",
        ),
    }
    url = f"{server.http_url}/v2/models/original/infer"
    for label, (call, status, text) in cases.items():
        got_status, message = _protocol_error(call)
        assert got_status == status and text in message, (label, got_status, message)
        logits = http.infer("original", _inputs(httpclient)).as_numpy("logits")
        assert np.max(np.abs(logits - expected)) <= 1e-5, f"after {label}"
    short = {"name": "input_ids", "shape": [2, 4], "datatype": "INT64", "data": [1, 2, 3]}
    for label, body in {
        "malformed JSON": b'{"inputs": [ {"name": ',
        "data does not fill the shape": json.dumps({"inputs": [short]}).encode(),
    }.items():
        status, message = _raw_post(url, body)
        assert 400 <= status < 600 and "error" in message, (label, status, message)
        logits = grpc.infer("original", _inputs(grpcclient)).as_numpy("logits")
        assert np.max(np.abs(logits - expected)) <= 1e-5, f"after {label}"
    assert http.is_server_live() and grpc.is_model_ready("original")
