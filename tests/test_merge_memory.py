"""An onnxruntime session of a tied model saves (almost) all the bytes the tie removed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.model.io import load_model, save_model
from layerfuse.model.stats import shared_matmul_weights
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.runtime.measure import measure_memory
from tests import graphs


def _saving(original, tied, feeds) -> int:
    return (
        measure_memory(original, feeds).after_run_bytes
        - measure_memory(tied, feeds).after_run_bytes
    )


def _tied_stack(tmp_path):
    """8 FFs of 512 x 2048 (8 MiB each) and the same stack tied into one: the shape where ORT's
    per-node pre-packing keeps a private copy of a shared weight for every MatMul reading it."""
    source = graphs.ff_stack(tmp_path / "src.onnx", [2048] * 8, model_dim=512, kind="relu")
    original = save_model(load_model(source), tmp_path / "a" / "model.onnx", external_data=True)
    plan = plan_merge(original, MergeRequest(ranges=[(0, 7)], method="vanilla"))
    tied = save_model(apply_plan(original, plan), tmp_path / "b" / "model.onnx", external_data=True)
    return original, tied, plan


def test_tied_stack_saves_at_least_95_percent_of_removed_bytes(tmp_path):
    original, tied, plan = _tied_stack(tmp_path)

    assert shared_matmul_weights(load_model(tied))
    feeds = {"hidden": np.ones((1, 64, 512), np.float32)}
    assert _saving(original, tied, feeds) >= 0.95 * plan.bytes_removed


@pytest.mark.slow
def test_tied_smollm2_saves_at_least_95_percent_of_removed_bytes(real, tmp_path):
    original = real.model("smollm2-135m")
    plan = plan_merge(original, MergeRequest(ranges=[(19, 29)], method="vanilla"))
    tied = save_model(apply_plan(original, plan), tmp_path / "tied" / "model.onnx")
    assert plan.bytes_removed == 10 * 3 * 576 * 1536 * 4
    feeds = {"input_ids": np.ones((1, 32), np.int64), "attention_mask": np.ones((1, 32), np.int64)}
    assert _saving(original, tied, feeds) >= 0.95 * plan.bytes_removed


def test_bench_prepacking_switch_reaches_the_sessions(tmp_path):
    # Pre-packing on brings back per-MatMul copies of the shared weight; --prepacking on/off
    # must reach both the timed sessions and the memory probe.
    _, tied, _ = _tied_stack(tmp_path)
    memory = {}
    for switch in ("on", "off"):
        out = tmp_path / f"{switch}.json"
        argv = ["bench", str(tied), "--inputs", "1x64", "--runs", "2", "--warmup", "1"]
        assert main([*argv, "--prepacking", switch, "--json", str(out)]) == 0
        document = json.loads(out.read_text())
        assert document["config"]["prepacking"] == (switch == "on")
        memory[switch] = document["graphs"][0]["memory"]["after_run_bytes"]
    one_weight = 512 * 2048 * 4
    assert memory["on"] - memory["off"] >= one_weight
