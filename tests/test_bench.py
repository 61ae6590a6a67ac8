"""The benchmark harness: memory sees duplication, byte counts are exact, the gate gates."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from layerfuse.cli import main
from layerfuse.model.stats import model_stats
from layerfuse.runtime.gate import find_regressions, parse_tolerance
from layerfuse.runtime.measure import measure_memory

SIDE = 2048  # a 2048 x 2048 float32 weight is 16 MiB


def _two_matmuls(path, duplicate: bool, side: int = SIDE) -> None:
    """x @ W1 @ W2 where W2 is W1 itself (shared) or a separate copy of the same values."""
    data = np.random.default_rng(0).standard_normal((side, side)).astype(np.float32) / side
    weights = [helper.make_tensor("w1", TensorProto.FLOAT, (side, side), data.ravel())]
    second = "w1"
    if duplicate:
        weights.append(helper.make_tensor("w2", TensorProto.FLOAT, (side, side), data.ravel()))
        second = "w2"
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("MatMul", ["h", second], ["y"]),
        ],
        "two_matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", side])],
        weights,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if side * side * 4 >= 1 << 20:
        onnx.save(model, path, save_as_external_data=True, location=path.name + ".data")
    else:
        onnx.save(model, path)


def test_memory_measure_sees_a_duplicated_initializer(tmp_path):
    # Pre-packing off: onnxruntime >= 1.21 would pack the two equal weights once (by hash).
    shared, duplicated = tmp_path / "shared.onnx", tmp_path / "duplicated.onnx"
    _two_matmuls(shared, duplicate=False)
    _two_matmuls(duplicated, duplicate=True)
    feeds = {"x": np.ones((4, SIDE), np.float32)}
    extra = (
        measure_memory(duplicated, feeds, prepacking=False).after_run_bytes
        - measure_memory(shared, feeds, prepacking=False).after_run_bytes
    )
    assert extra >= 0.9 * SIDE * SIDE * 4


def test_byte_counts_are_exact(tmp_path):
    shared, duplicated = tmp_path / "shared.onnx", tmp_path / "duplicated.onnx"
    _two_matmuls(shared, duplicate=False, side=64)
    _two_matmuls(duplicated, duplicate=True, side=64)
    one = 64 * 64 * 4
    a, b = model_stats(shared), model_stats(duplicated)
    assert (a.parameters, a.initializer_bytes, a.unique_content_bytes, a.shared_weights) == (
        64 * 64,
        one,
        one,
        1,
    )
    assert (b.parameters, b.initializer_bytes, b.unique_content_bytes, b.shared_weights) == (
        2 * 64 * 64,
        2 * one,
        one,
        0,
    )
    assert b.file_bytes == duplicated.stat().st_size


@pytest.fixture(scope="module")
def bench_result(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    original = tiny.model("llama")
    tied = out / "tied" / "model.onnx"
    assert (
        main(["merge", str(original), "-o", str(tied), "--blocks", "0-3", "--method", "vanilla"])
        == 0
    )
    result = out / "result.json"
    options = "--names original,tied --inputs 1x16,2x32 --runs 15 --eval --data random"
    files = ["--json", str(result), "--markdown", str(out / "result.md")]
    files += ["--plot", str(out / "result.png"), "--eval-tokens", "256"]
    assert main(["bench", str(original), str(tied), *options.split(), *files]) == 0
    return original, tied, result


def test_bench_writes_json_markdown_and_plot(bench_result):
    _, _, result = bench_result
    document = json.loads(result.read_text())
    assert document["schema"] == "layerfuse.bench/1"
    assert document["environment"]["packages"]["onnxruntime"]
    original, tied = document["graphs"]
    assert original["ratios"]["speedup"] == {"1x16": 1.0, "2x32": 1.0}
    assert tied["ratios"]["file_size"] < 1.0
    assert tied["stats"]["shared_weights"] == 3
    assert tied["stats"]["parameters"] < original["stats"]["parameters"]
    assert original["quality"]["value"] == 1.0 and 0 < tied["quality"]["value"] < 1.0
    assert len(tied["latency"]["2x32"]) == 5 and tied["latency"]["2x32"]["runs"] == 15
    markdown = result.with_suffix(".md").read_text()
    assert "| tied | 2x32 |" in markdown
    assert result.with_suffix(".png").stat().st_size > 10_000


def test_gate_passes_on_the_same_result_and_fails_on_an_injected_regression(
    bench_result, tmp_path, capsys
):
    original, tied, result = bench_result
    document = json.loads(result.read_text())
    assert find_regressions(document, document, 0.10) == []
    better = json.loads(result.read_text())
    better["graphs"][1]["ratios"]["speedup"]["1x16"] *= 1.5
    better["graphs"][1]["ratios"]["file_size"] *= 0.5
    regressions = find_regressions(document, better, 0.10)
    assert {r.measure for r in regressions} == {"speedup at 1x16", "file_size ratio"}
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(better))
    args = [
        "bench",
        str(original),
        str(tied),
        "--names",
        "original,tied",
        "--inputs",
        "1x16",
        "--runs",
        "5",
        "--no-memory",
        "--baseline",
        str(baseline),
        "--max-regression",
        "10%",
    ]
    capsys.readouterr()
    assert main(args) == 1
    assert "file_size ratio" in capsys.readouterr().err
    baseline.write_text(result.read_text())
    assert main([*args[:-2], "--max-regression", "99%"]) == 0


def test_tolerance_parsing():
    assert parse_tolerance("10%") == pytest.approx(0.10)
    assert parse_tolerance("0.25") == pytest.approx(0.25)


def test_bad_bench_input_is_one_line(tiny, tmp_path, capsys):
    cases = [
        ([str(tiny.model("llama")), str(tiny.model("vit"))], "only graphs with the same inputs"),
        ([str(tiny.model("llama")), "--provider", "tpu"], "invalid choice: 'tpu'"),
        ([str(tmp_path / "missing.onnx")], "no such file"),
        ([str(tiny.model("llama")), "--inputs", "1by32"], "is not BATCHxSEQUENCE"),
        ([str(tiny.model("llama")), "--max-regression", "lots"], "not a percentage"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["bench", *extra, "--no-memory", "--runs", "1"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
