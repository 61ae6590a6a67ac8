"""Committed plans stay usable: an old plan file loads, saves in today's schema, and still
reproduces the committed result on the real model it was made for. A plan serves every
signature of the model it was made for (plain and --kv-cache exports) and no other model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from layerfuse.data.batches import make_batches
from layerfuse.errors import PlanError
from layerfuse.export.onnx_export import export_model
from layerfuse.export.sources import load_source
from layerfuse.model.fingerprint import fingerprint, legacy_fingerprint, matches
from layerfuse.model.io import load_model, save_model
from layerfuse.passes.base import source_fingerprint
from layerfuse.passes.fuse.plan import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PrunePlan
from layerfuse.runtime.calibration import adapt_feeds
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
    assert matches(load_model(original), plan.fingerprint)  # a fingerprint of the first scheme
    fused = save_model(apply_plan(original, plan), tmp_path / "fused" / "model.onnx")
    # The benchmark's own measurement: test split, 16384 tokens in rows of 128, without BOS
    # (SmolLM2's tokenizer adds none by default, so this is also what is fed today).
    batches = make_batches(original, "fortunes", "test", tokens=16384, seq_len=128, bos=False)
    measured = perplexity(create_session(fused, provider="cpu"), batches)
    assert measured == pytest.approx(committed["perplexity"]["fused"], rel=1e-3)


@pytest.fixture(scope="module")
def signatures(tiny, tmp_path_factory) -> tuple[Path, Path]:
    """The tiny Llama's plain export and its --kv-cache export, from the same weights."""
    kv = tmp_path_factory.mktemp("kv") / "llama"
    source = load_source(str(tiny.folder("llama")))
    return tiny.model("llama"), export_model(source, kv, kv_cache=True).model_path


def _prefill_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = create_session(path, provider="cpu")
    feeds = adapt_feeds(session, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return session.run(None, feeds)[0]


def test_a_plan_made_on_the_plain_export_applies_to_the_kv_cache_export(signatures, tmp_path):
    plain, kv = signatures
    assert fingerprint(load_model(plain)) == fingerprint(load_model(kv))
    assert legacy_fingerprint(load_model(plain)) != legacy_fingerprint(load_model(kv))
    plan = plan_merge(plain, MergeRequest(ranges=[(1, 2)], method="vanilla"))
    merged = {
        name: save_model(apply_plan(path, plan), tmp_path / name / "model.onnx")
        for name, path in (("plain", plain), ("kv", kv))
    }
    ids = np.random.default_rng(0).integers(3, 200, size=(2, 12))
    plain_logits, kv_logits = (_prefill_logits(merged[name], ids) for name in ("plain", "kv"))
    np.testing.assert_allclose(kv_logits, plain_logits, atol=1e-5, rtol=0)
    assert not np.allclose(plain_logits, _prefill_logits(plain, ids), atol=1e-3)


def test_a_plan_for_other_weights_is_refused(signatures):
    plain, _ = signatures
    plan = PrunePlan(fingerprint(load_model(plain)), 4, "ff", [1])
    model = load_model(plain)
    weight = next(v for v in model.graph.initializers.values() if len(v.shape or ()) == 2)
    weight.const_value = ir.tensor(weight.const_value.numpy() * 1.01, name=weight.name)
    with pytest.raises(PlanError, match="other weights or other ops reading them"):
        plan.rewrite_pass()(model)


def test_a_plan_with_a_first_scheme_fingerprint_applies_and_records_todays(signatures):
    plain, kv = signatures
    old = PrunePlan(legacy_fingerprint(load_model(plain)), 4, "ff", [1])
    rewritten = apply_plan(plain, old)
    assert old.fingerprint == fingerprint(load_model(plain))
    assert source_fingerprint(rewritten) == fingerprint(load_model(plain))
    # The first scheme hashed the wiring: such a plan still fits only the export it was made on.
    with pytest.raises(PlanError, match="fingerprint"):
        apply_plan(kv, PrunePlan(legacy_fingerprint(load_model(plain)), 4, "ff", [1]))
