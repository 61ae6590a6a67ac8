"""Committed plans stay usable: an old plan file loads, saves in today's schema, and still
reproduces the committed result on the real model it was made for."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from layerfuse.data.batches import make_batches
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, save_model
from layerfuse.passes.fuse.plan import FusePlan
from layerfuse.passes.plan import apply_plan
from layerfuse.runtime.quality import perplexity
from layerfuse.runtime.session import create_session

RESULTS = Path(__file__).parents[1] / "benchmarks" / "results" / "ffn_fusion_cpu.json"


@pytest.fixture(scope="module")
def committed() -> dict:
    """The FFN Fusion result on SmolLM2-135M, whose plan was saved as ``fuse-plan/1``."""
    return json.loads(RESULTS.read_text())


def _version_1_plan(committed: dict, tmp_path: Path) -> Path:
    path = tmp_path / "plan-v1.json"
    path.write_text(json.dumps(committed["plan"]))
    return path


def test_version_1_fuse_plan_loads_and_saves_as_version_2(committed, tmp_path):
    assert committed["plan"]["schema"] == "layerfuse.fuse-plan/1"
    plan = FusePlan.load(_version_1_plan(committed, tmp_path))
    assert plan.fuse == [(3, 8)]
    assert plan.ffn_only_runs == [(3, 9)]
    assert plan.drop_attention == [4, 5, 6, 7, 8, 9]
    saved = json.loads(plan.save(tmp_path / "plan-v2.json").read_text())
    assert saved["schema"] == "layerfuse.fuse-plan/2"
    assert FusePlan.load(tmp_path / "plan-v2.json") == plan


@pytest.mark.slow
def test_committed_fusion_plan_reproduces_its_perplexity(real, committed, tmp_path):
    original = real.model("smollm2-135m")
    plan = FusePlan.load(_version_1_plan(committed, tmp_path))
    assert fingerprint(load_model(original)) == plan.fingerprint
    fused = save_model(apply_plan(original, plan), tmp_path / "fused" / "model.onnx")
    # The benchmark's own measurement: test split, 16384 tokens in rows of 128.
    batches = make_batches(original, "fortunes", "test", tokens=16384, seq_len=128)
    measured = perplexity(create_session(fused, provider="cpu"), batches)
    assert measured == pytest.approx(committed["perplexity"]["fused"], rel=1e-3)
