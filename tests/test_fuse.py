"""FFN Fusion: the fused node is exactly the parallel sum, the graph stays valid everywhere."""

from __future__ import annotations

import collections
import json

import numpy as np
import onnx
import pytest

from layerfuse.cli import main
from layerfuse.data.batches import make_batches
from layerfuse.errors import PlanError
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, save_model
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan, FuseRequest, find_runs, plan_fuse
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.runtime.calibration import ActivationTap, token_rows
from layerfuse.runtime.session import create_session, session_for_ir
from tests import graphs, references

RANDOM = DataSettings(data="random", calib_tokens=128, valid_tokens=128, seq_len=16)


def _plan(path, drop: list[int], fuse: list[tuple[int, int]]) -> FusePlan:
    model = load_model(path)
    return FusePlan(fingerprint(model), len(detect_structure(model).blocks), drop, fuse)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_node_equals_the_torch_sum_of_the_parallel_ffns(tiny, family):
    path = tiny.model(family)
    run_input = detect_structure(apply_plan(path, _plan(path, [2, 3], []))).blocks[1]
    run_input = run_input.ff_wiring.norm.input.name
    model = apply_plan(path, _plan(path, [2, 3], [(1, 3)]))
    tap = ActivationTap(
        model,
        [run_input, "layerfuse.fused.1-3.ffn"],
        external_data_dir=path.parent,
        provider="cpu",
    )
    for batch in make_batches(path, "random", "calib", tokens=128, seq_len=16, batch_size=4):
        _, tapped = tap.run(batch.feeds)
        x = token_rows(tapped[run_input], batch.mask)
        fused = token_rows(tapped["layerfuse.fused.1-3.ffn"], batch.mask)
        expected = references.parallel_ffn_sum(family, [1, 2, 3], x)
        np.testing.assert_allclose(fused, expected, atol=2e-5)


def test_fused_relu_stack_equals_the_numpy_parallel_sum(tmp_path):
    path = graphs.ff_stack(tmp_path / "stack.onnx", [8, 8, 8], kind="relu")
    weights = {
        tensor.name: onnx.numpy_helper.to_array(tensor)
        for tensor in onnx.load(path).graph.initializer
    }
    model = apply_plan(path, _plan(path, [], [(0, 2)]))
    x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float64)
    tap = ActivationTap(
        model, ["layerfuse.fused.0-2.ffn"], external_data_dir=tmp_path, provider="cpu"
    )
    _, tapped = tap.run({"hidden": x.astype(np.float32)})
    expected = 0.0
    for block in range(3):
        w = {k.split(".", 1)[1]: v for k, v in weights.items() if k.startswith(f"b{block}.")}
        normed = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w["norm"]
        expected = expected + np.maximum(normed @ w["up"] + w["up_b"], 0) @ w["down"]
    np.testing.assert_allclose(tapped["layerfuse.fused.0-2.ffn"], expected, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2", "vit"])
def test_fusing_a_run_of_one_block_is_a_no_op(tiny, family):
    path = tiny.model(family)
    batch = make_batches(path, "random", "calib", tokens=64, seq_len=16, batch_size=4)[0]
    reference = create_session(path, provider="cpu").run(None, batch.feeds)[0]
    model = apply_plan(path, _plan(path, [], [(2, 2)]))
    assert any(node.domain == "layerfuse" for node in model.graph)
    fused = session_for_ir(model, path.parent, provider="cpu").run(None, batch.feeds)[0]
    assert np.max(np.abs(fused - reference)) <= 1e-5


def test_fused_graph_is_valid_optimizable_and_smaller_in_nodes(tiny, tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    path = tiny.model("llama")
    plan = plan_fuse(path, FuseRequest(drop_attention=[2, 3], include_last=True, data=RANDOM))
    assert plan.fuse == [(1, 3)]
    out = save_model(apply_plan(path, plan), tmp_path / "fused" / "model.onnx")
    onnx.checker.check_model(str(out), full_check=True)
    batch = make_batches(path, "random", "calib", tokens=64, seq_len=16, batch_size=4)[0]
    plain = create_session(out, provider="cpu", optimization="all").run(None, batch.feeds)[0]
    optimized = optimize_model(
        str(out), model_type="gpt2", num_heads=4, hidden_size=32, opt_level=0
    )
    ops = collections.Counter(node.op_type for node in optimized.model.graph.node)
    assert ops["FusedSwiGLU"] == 1 and ops["SkipSimplifiedLayerNormalization"] > 0
    optimized.save_model_to_file(str(tmp_path / "optimized.onnx"))
    after = create_session(tmp_path / "optimized.onnx", provider="cpu").run(None, batch.feeds)[0]
    assert np.max(np.abs(after - plain)) <= 1e-4
    matmuls = [n for n in load_model(out).graph if n.op_type == "MatMul"]
    original_matmuls = [n for n in load_model(path).graph if n.op_type == "MatMul"]
    # Three FFNs of three MatMuls each became one node; two attentions were removed.
    assert len(original_matmuls) - len(matmuls) == 9 + 2 * 6


def test_runs_and_dependency_follow_the_removed_attention(tiny):
    path = tiny.model("llama")
    assert find_runs(detect_structure(apply_plan(path, _plan(path, [1, 2], [])))) == [(0, 2)]
    plan = plan_fuse(
        path,
        FuseRequest(
            drop_attention=[1, 2],
            data=RANDOM,
        ),
    )
    assert plan.ffn_only_runs == [(0, 2)] and plan.fuse == [(0, 1)]  # the last FFN stays out
    (entry,) = plan.dependency
    matrix = np.asarray(entry["matrix"])
    assert matrix.shape == (3, 3)
    assert np.all(np.tril(matrix) == 0) and np.all(matrix[np.triu_indices(3, 1)] > 0)


def test_attention_importance_picks_the_least_harmful(tiny, tmp_path):
    path = tiny.model("llama")
    out = tmp_path / "fused" / "model.onnx"
    options = "--drop-attention 2 --data random --calib-tokens 128 --include-last".split()
    assert main(["fuse", str(path), "-o", str(out), *options]) == 0
    saved = json.loads(out.with_suffix(".plan.json").read_text())
    scores = saved["attention_scores"]
    assert saved["drop_attention"] == sorted(np.argsort(scores)[:2].tolist())
    assert out.with_name("model.attention.png").is_file()
    again = tmp_path / "again" / "model.onnx"
    assert (
        main(["fuse", str(path), "-o", str(again), "--plan", str(out.with_suffix(".plan.json"))])
        == 0
    )
    first, second = load_model(out), load_model(again)
    assert sorted(first.graph.initializers) == sorted(second.graph.initializers)
    assert FusePlan.load(out.with_suffix(".plan.json")).fuse == [tuple(g) for g in saved["fuse"]]


def test_bad_fusion_requests_are_clear_errors(tiny, tmp_path, capsys):
    path = tiny.model("llama")
    with pytest.raises(PlanError, match="block 2 still has attention"):
        plan_fuse(path, FuseRequest(fuse=[(1, 3)], include_last=True))
    out = tmp_path / "x" / "model.onnx"
    for extra, message in (
        (["--runs", "1-3", "--include-last"], "still has attention"),
        (["--runs", "3-1"], "run 3-1 does not fit a model of 4 blocks"),
        (["--runs", "1-2,2-3", "--drop-attention", "2,3"], "overlaps another run"),
        (["--drop-attention", "9"], "cannot drop 9 attention sublayers"),
    ):
        capsys.readouterr()
        options = ["--data", "random", "--calib-tokens", "64", *extra]
        assert main(["fuse", str(path), "-o", str(out), *options]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not out.parent.exists()


def test_post_norm_models_are_refused(tiny):
    path = tiny.model("bert")
    with pytest.raises(PlanError, match="needs pre-norm FFNs"):
        apply_plan(path, _plan(path, [], [(1, 1)]))


def test_contiguous_attention_removal_yields_one_long_run(tiny):
    path = tiny.model("llama")
    request = FuseRequest(
        drop_attention=2,
        contiguous=True,
        include_last=True,
        data=RANDOM,
    )
    plan = plan_fuse(path, request)
    first = plan.drop_attention[0]
    assert plan.drop_attention == [first, first + 1]
    scored = [i for i, s in enumerate(plan.attention_scores) if s is not None]
    assert scored == [0, 1, 2]
    assert plan.attention_scores[first] == min(plan.attention_scores[i] for i in scored)
    assert plan.fuse == [(max(first - 1, 0), first + 1)]


@pytest.mark.parametrize(
    ("attention", "window", "include_last", "members"),
    [
        ([True] * 6, range(0, 1), False, 0),  # block 0's attention: nothing before it to join
        ([True] * 6, range(2, 3), False, 1),  # FFs 1-2 join; the run's last stays out
        ([True] * 6, range(2, 3), True, 2),
        ([True] * 6, range(2, 4), False, 2),  # FFs 1-3 join, 1-2 fused
        ([True, True, False, True, True, True], range(3, 4), False, 2),  # joins a gap at 2
        ([True] * 6, range(4, 6), False, 2),  # FFs 3-5, the model's end
    ],
)
def test_a_fusion_window_counts_the_ffns_it_leaves_to_fuse(
    attention, window, include_last, members
):
    from layerfuse.passes.fuse.attention import _fused_members

    left = [present and index not in window for index, present in enumerate(attention)]
    assert _fused_members(left, window, include_last) == members
