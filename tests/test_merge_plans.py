"""Merge plans: window selection and placement, the saved plan's round trip, and the clear
errors for bad ratios, windows, shapes, calibration data and plans of another model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.errors import DataError, PlanError
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.merge.plan import parse_ratio
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from tests import graphs


def test_plan_round_trip_applies_identically(tiny, tmp_path, capsys):
    path = tiny.model("llama")
    out = tmp_path / "merged" / "model.onnx"
    assert (
        main(
            [
                "merge",
                str(path),
                "-o",
                str(out),
                "--blocks",
                "1-3",
                "--data",
                "random",
                "--calib-tokens",
                "512",
            ]
        )
        == 0
    )
    plan_file = out.with_suffix(".plan.json")
    saved = json.loads(plan_file.read_text())
    assert saved["schema"] == "layerfuse.merge-plan/1"
    assert saved["windows"][0]["blocks"] == [1, 2, 3]
    assert len(saved["windows"][0]["permutations"]["2"]) == 64
    again = tmp_path / "again" / "model.onnx"
    assert main(["merge", str(path), "-o", str(again), "--plan", str(plan_file)]) == 0
    first, second = load_model(out), load_model(again)
    for name, value in first.graph.initializers.items():
        np.testing.assert_array_equal(
            value.const_value.numpy(), second.graph.initializers[name].const_value.numpy()
        )
    assert (out.parent / "layerfuse.json").is_file()


def test_sliding_selection_scores_every_position(tiny):
    path = tiny.model("llama")
    request = MergeRequest(
        ratio="1/2",
        data=DataSettings(data="random", calib_tokens=256, valid_tokens=256, seq_len=16),
    )
    plan = plan_merge(path, request)
    candidates = plan.selection["candidates"][0]
    assert [c["blocks"] for c in candidates] == [[0, 2], [1, 3]]
    best = min(candidates, key=lambda c: c["score"])
    assert plan.windows[0].blocks == list(range(best["blocks"][0], best["blocks"][1] + 1))


def test_bad_ratio_and_windows_are_clear_errors(tiny, tmp_path, capsys):
    path = tiny.model("llama")
    out = tmp_path / "x" / "model.onnx"
    cases = [
        (["--ratio", "1/100"], "removes none"),
        (["--ratio", "3/2"], "between 0 and 1"),
        (["--ratio", "abc"], "not a fraction"),
        (["--blocks", "2-9"], "window 2-9 does not fit a model of 4 blocks"),
        (["--ratio", "1/2", "--windows", "3"], "3 windows cannot remove only 2"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["merge", str(path), "-o", str(out), "--method", "vanilla", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not out.parent.exists()
    assert parse_ratio("all-but-one", 30) == 29
    assert parse_ratio("1/3", 30) == 10


def test_ffs_of_different_shapes_cannot_share_weights(tmp_path):
    path = graphs.ff_stack(tmp_path / "stack.onnx", [8, 8, 16])
    plan_merge(path, MergeRequest(ranges=[(0, 1)], method="vanilla"))
    with pytest.raises(PlanError, match=r"differ in kind, shape or layout"):
        plan_merge(path, MergeRequest(ranges=[(1, 2)], method="vanilla"))


def test_calibration_data_must_match_the_model(tiny, tmp_path):
    with pytest.raises(DataError, match="vision model"):
        plan_merge(
            tiny.model("vit"), MergeRequest(ranges=[(0, 1)], data=DataSettings(data="fortunes"))
        )
    stack = graphs.ff_stack(tmp_path / "stack.onnx", [8, 8])
    with pytest.raises(DataError, match=r"no layerfuse\.json"):
        plan_merge(stack, MergeRequest(ranges=[(0, 1)], method="permute"))


def test_plan_for_another_model_is_refused(tiny):
    plan = plan_merge(tiny.model("llama"), MergeRequest(ranges=[(0, 1)], method="vanilla"))
    with pytest.raises(PlanError, match="fingerprint"):
        apply_plan(tiny.model("llama", "torchscript"), plan)


def test_several_windows_are_placed_without_overlap(tiny):
    path = tiny.model("llama")
    request = MergeRequest(
        ratio="1/2",
        windows=2,
        method="vanilla",
        data=DataSettings(data="random", valid_tokens=256, seq_len=16),
    )
    plan = plan_merge(path, request)
    first, second = (w.blocks for w in plan.windows)
    assert len(first) == len(second) == 2 and not set(first) & set(second)
    assert plan.selection["candidates"][0], "the first window was chosen by validation score"
    assert plan.merged_blocks == 2
    tied = apply_plan(path, plan)
    shared = {b.ff.linears["up"].consumed_weight.name for b in detect_structure(tied).blocks}
    assert len(shared) == 2
