"""``optimize``'s side-by-side measurement: resident memory for every graph, and decode speed
for a causal LM exported with a KV cache (a pruned copy decodes faster per token than the
original, both on the same real prompts); graphs without a cache get no decode speed."""

from __future__ import annotations

import math

import pytest

from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.optimize.measure import measure_models
from layerfuse.optimize.space import space_document
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.progress import SILENT
from tests import kv_models


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> kv_models.GenerationModels:
    return kv_models.shared(tmp_path_factory)


def _measure(models: dict) -> dict:
    measure = space_document({}).measure | {"test_tokens": 256, "shape": "1x32", "latency_runs": 2}
    measure["decode"] = {"batch": 1, "context": 16, "new_tokens": 8, "repeats": 2}
    return measure_models(
        models, metric="perplexity", data="fortunes", measure=measure, seq_len=32,
        provider="cpu", reporter=SILENT,
    )  # fmt: skip


def test_kv_cache_graphs_are_decoded_and_every_graph_has_its_memory(lm, tmp_path):
    pruned = tmp_path / "pruned" / "model.onnx"
    plan = plan_prune(lm.export, PruneRequest(count=2))
    save_model(apply_plan(lm.export, plan), pruned)
    carry_manifest(lm.export, pruned)
    results = _measure({"original": lm.export, "pruned": pruned})
    original, smaller = results["original"], results["pruned"]
    assert smaller["parameters"] == parameter_count(load_model(pruned))
    assert smaller["parameters"] < original["parameters"]
    for row in (original, smaller):
        assert row["memory_bytes"] > 0
        assert row["decode_tokens_per_second"] > 0
        assert math.isfinite(row["quality"]) and row["quality"] > 1


def test_graphs_without_a_cache_get_no_decode_speed(tiny):
    results = _measure({"original": tiny.model("llama")})
    assert results["original"]["decode_tokens_per_second"] is None
    assert results["original"]["memory_bytes"] > 0
