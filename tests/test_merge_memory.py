"""An onnxruntime session of a tied model saves (almost) all the bytes the tie removed."""

from __future__ import annotations

import json
import platform

import numpy as np
import onnxruntime
import pytest

from layerfuse.cli import main
from layerfuse.model.io import load_model, save_model
from layerfuse.model.stats import shared_matmul_weights
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.runtime.measure import measure_memory
from layerfuse.runtime.session import (
    default_prepacking,
    prepacked_weights_deduplicated,
    release_freed_memory,
)
from tests import graphs


def _saving(original, tied, feeds) -> int:
    return (
        measure_memory(original, feeds).after_run_bytes
        - measure_memory(tied, feeds).after_run_bytes
    )


def _tied_stack(tmp_path):
    """8 FFs of 512 x 2048 (8 MiB each) and the same stack tied into one: weights below glibc's
    32 MiB mmap ceiling, where freed pre-packing buffers stay in the heap unless released."""
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


def test_default_policy_prepacks_and_keeps_95_percent_of_removed_bytes(tmp_path):
    # The policy (pre-packing on, freed packing buffers released) must keep the saving in a
    # fresh process while pre-packing is really on: the session packs the weights at load
    # instead of touching the mmapped file on the first run. Whether glibc keeps the freed
    # packing buffers without the release depends on the machine's heap, so only the policy's
    # result is asserted.
    original, tied, plan = _tied_stack(tmp_path)
    feeds = {"hidden": np.ones((1, 64, 512), np.float32)}
    policy = {path: measure_memory(path, feeds) for path in (original, tied)}
    unpacked = measure_memory(tied, feeds, prepacking=False)
    assert prepacked_weights_deduplicated()
    assert policy[original].after_run_bytes - policy[tied].after_run_bytes >= (
        0.95 * plan.bytes_removed
    )
    tied_weights = plan.bytes_removed / 7  # 8 FFs became 1: one FF's weights remain
    assert policy[tied].load_bytes - unpacked.load_bytes >= 0.9 * tied_weights
    assert release_freed_memory() == (platform.libc_ver()[0] == "glibc")


def test_older_onnxruntime_falls_back_to_no_prepacking_for_tied_graphs(tmp_path, monkeypatch):
    # Before 1.21 every kernel owns its packed copy, so auto keeps the saving by not packing.
    source = graphs.ff_stack(tmp_path / "src.onnx", [32] * 3, kind="relu")
    plan = plan_merge(source, MergeRequest(ranges=[(0, 2)], method="vanilla"))
    tied = apply_plan(source, plan)
    assert prepacked_weights_deduplicated("1.21.0")
    assert prepacked_weights_deduplicated("1.32.0.dev20260101")
    assert not prepacked_weights_deduplicated("1.9.0")
    assert default_prepacking(tied) and default_prepacking(load_model(source))
    monkeypatch.setattr(onnxruntime, "__version__", "1.20.1")
    assert not default_prepacking(tied)
    assert default_prepacking(load_model(source))


def test_bench_prepacking_switch_reaches_the_sessions(tmp_path):
    # --prepacking off must reach the memory probe (the session holds no packed weights
    # at load) and the document; on and auto pack at load.
    _, tied, plan = _tied_stack(tmp_path)
    load = {}
    for switch in ("on", "off", "auto"):
        out = tmp_path / f"{switch}.json"
        argv = ["bench", str(tied), "--inputs", "1x64", "--runs", "2", "--warmup", "1"]
        assert main([*argv, "--prepacking", switch, "--json", str(out)]) == 0
        document = json.loads(out.read_text())
        assert document["config"]["prepacking"] == {"on": True, "off": False, "auto": None}[switch]
        load[switch] = document["graphs"][0]["memory"]["load_bytes"]
    tied_weights = plan.bytes_removed / 7
    assert min(load["on"], load["auto"]) - load["off"] >= 0.9 * tied_weights
