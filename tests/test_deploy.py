"""``layerfuse deploy triton``: repositories that agree with the graph, manifests, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from layerfuse.cli import main
from layerfuse.deploy.manifests import MANIFEST_NAME
from layerfuse.deploy.signature import graph_signature
from layerfuse.deploy.triton_config import parse_config
from layerfuse.deploy.triton_repo import check_model_dir, read_repository
from layerfuse.model.io import load_model, save_model
from layerfuse.runtime.session import create_session

mc = pytest.importorskip(
    "tritonclient.grpc.model_config_pb2", reason="the serve extra is not installed"
)


def _deploy(model, repo, name, *extra) -> int:
    return main(["deploy", "triton", str(model), "--repo", str(repo), "--name", name, *extra])


def _fixed_shape_graph(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    onnx.save(model, path)
    return path


def test_onnxruntime_backend_config_matches_the_graph(tiny, tmp_path):
    model = tiny.model("llama")
    assert _deploy(model, tmp_path / "repo", "llama") == 0
    folder = tmp_path / "repo" / "llama"
    config = parse_config(folder / "config.pbtxt")
    signature = graph_signature(load_model(model))
    assert config.backend == "onnxruntime" and config.default_model_filename == "model.onnx"
    assert config.max_batch_size == 8
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [group.kind for group in config.instance_group] == [config.instance_group[0].KIND_CPU]
    declared = {t.name: (t.data_type, [-1, *t.dims]) for t in (*config.input, *config.output)}
    assert declared == {
        "input_ids": (mc.TYPE_INT64, [-1, -1]),
        "attention_mask": (mc.TYPE_INT64, [-1, -1]),
        "logits": (mc.TYPE_FP32, [-1, -1, 256]),
    }
    assert [spec.name for spec in signature.inputs] == [t.name for t in config.input]
    assert not set(config.parameters), "the onnxruntime backend would ignore extra parameters"
    assert "Pre-packing stays on" in (folder / "config.pbtxt").read_text()
    assert (folder / "1" / "model.onnx").read_bytes() == Path(model).read_bytes()
    assert not (folder / "1" / "model.py").exists()
    assert check_model_dir(folder) == []


def test_python_backend_writes_model_py_and_stub_settings(tiny, tmp_path):
    model = tiny.model("llama")
    code = _deploy(
        model, tmp_path, "py", "--backend", "python", "--python-env", "/envs/stub.tar.gz",
        "--max-batch-size", "0", "--threads", "2", "--instances", "3",
    )  # fmt: skip
    assert code == 0
    config = parse_config(tmp_path / "py" / "config.pbtxt")
    assert config.backend == "python" and config.max_batch_size == 0
    assert [list(t.dims) for t in config.input] == [[-1, -1], [-1, -1]]
    assert not config.HasField("dynamic_batching")
    assert config.instance_group[0].count == 3
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    assert parameters == {
        "EXECUTION_ENV_PATH": "/envs/stub.tar.gz",
        "max_input_elements": "16384",
        "intra_op_thread_count": "2",
        "inter_op_thread_count": "1",
    }
    assert "class TritonPythonModel" in (tmp_path / "py" / "1" / "model.py").read_text()
    assert [entry.backend for entry in read_repository(tmp_path)] == ["python"]


def test_external_data_travels_with_the_model(tiny, tmp_path):
    source = save_model(
        load_model(tiny.model("llama")), tmp_path / "src" / "weights.onnx", external_data=True
    )
    data = source.with_name("weights.onnx.data")
    assert data.stat().st_size > 0
    assert _deploy(source, tmp_path / "repo", "ext") == 0
    version = tmp_path / "repo" / "ext" / "1"
    assert sorted(p.name for p in version.iterdir()) == ["model.onnx", "weights.onnx.data"]
    assert (version / "weights.onnx.data").read_bytes() == data.read_bytes()
    feeds = {"input_ids": np.array([[3, 4, 5]]), "attention_mask": np.ones((1, 3), np.int64)}
    expected = create_session(source, provider="cpu").run(None, feeds)[0]
    deployed = create_session(version / "model.onnx", provider="cpu").run(None, feeds)[0]
    np.testing.assert_array_equal(deployed, expected)


def test_graph_without_open_batch_dimension_is_not_batched(tmp_path):
    model = _fixed_shape_graph(tmp_path / "fixed.onnx")
    assert _deploy(model, tmp_path / "repo", "fixed") == 0
    config = parse_config(tmp_path / "repo" / "fixed" / "config.pbtxt")
    assert config.max_batch_size == 0
    assert [list(t.dims) for t in (*config.input, *config.output)] == [[2, 4], [2, 4]]


def _assert_one_line_error(capsys, *words: str) -> None:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("layerfuse: error:"), err
    for word in words:
        assert word in err, err


def test_bad_inputs_are_one_line_and_write_nothing(tiny, tmp_path, capsys):
    model = tiny.model("llama")
    repo = tmp_path / "repo"
    assert _deploy(model, repo, "a/b") == 2
    _assert_one_line_error(capsys, "a/b", "letters")
    assert not repo.exists()

    assert _deploy(model, repo, "ok") == 0
    capsys.readouterr()
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    assert _deploy(model, repo, "ok") == 2
    _assert_one_line_error(capsys, "already exists")

    broken = save_model(load_model(model), tmp_path / "src" / "model.onnx", external_data=True)
    broken.with_name("model.onnx.data").unlink()
    assert _deploy(broken, repo, "nodata") == 2
    _assert_one_line_error(capsys, "external data", "missing")
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before

    assert _deploy(model, repo, "neg", "--instances", "0") == 2
    _assert_one_line_error(capsys, "instances")
    assert not (repo / "neg").exists()


def test_validator_names_every_disagreement(tiny, tmp_path):
    assert _deploy(tiny.model("llama"), tmp_path, "m") == 0
    path = tmp_path / "m" / "config.pbtxt"
    text = path.read_text()
    path.write_text(
        text.replace("TYPE_FP32", "TYPE_FP16")
        .replace('name: "attention_mask"', 'name: "mask"')
        .replace("dims: 256", "dims: 255")
        + 'parameters { key: "session.disable_prepacking" value { string_value: "1" } }\n'
    )
    problems = check_model_dir(tmp_path / "m", load=False)
    assert any("'logits' is TYPE_FP16" in p for p in problems), problems
    assert any("'mask' is not a input" in p for p in problems), problems
    assert any("'attention_mask' is missing" in p for p in problems), problems
    assert any("dims [-1, -1, 255]" in p for p in problems), problems
    assert any("session.disable_prepacking" in p and "ignored" in p for p in problems), problems
    path.write_text(text.replace("max_batch_size", "max_batch_sise"))
    (problem,) = check_model_dir(tmp_path / "m")
    assert "max_batch_sise" in problem


def test_manifest_points_triton_at_the_repository(tiny, tmp_path, capsys):
    model = tiny.model("llama")
    repo = tmp_path / "My Repo"
    assert _deploy(model, repo, "a", "--storage-uri", "s3://bucket/repo", "--json") == 0
    written = json.loads(capsys.readouterr().out)
    assert written["manifest"] == str(repo / MANIFEST_NAME)
    assert [i["name"] for i in written["inputs"]] == ["input_ids", "attention_mask"]
    assert _deploy(model, repo, "b", "--device", "gpu", "--storage-uri", "s3://bucket/repo") == 0
    document = yaml.safe_load((repo / MANIFEST_NAME).read_text())
    assert (document["apiVersion"], document["kind"]) == (
        "serving.kserve.io/v1beta1",
        "InferenceService",
    )
    assert document["metadata"]["name"] == "my-repo"
    predictor = document["spec"]["predictor"]["model"]
    assert predictor["modelFormat"] == {"name": "triton", "version": "2"}
    assert predictor["runtime"] == "kserve-tritonserver"
    assert predictor["protocolVersion"] == "v2"
    assert predictor["storageUri"] == "s3://bucket/repo"
    assert {"name": "MALLOC_MMAP_THRESHOLD_", "value": "131072"} in predictor["env"]
    assert predictor["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert predictor["resources"]["requests"]["memory"].endswith("Gi")
