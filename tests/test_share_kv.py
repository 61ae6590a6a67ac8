"""Cross-layer KV sharing on a tiny Llama: equal to torch with the same sharing, with a cache.

The torch reference shares the same way the graph does: layer ``target``'s key and value
projections return what layer ``source``'s computed in the same forward, so its rotary
embedding (same positions) and its cache slot hold exactly the source's keys and values.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.errors import PlanError
from layerfuse.generate import Decoder, generate_ids
from layerfuse.model.cache import kv_bytes_per_token, paired_cache
from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.share_kv import ShareKVPlan, ShareKVRequest, kv_layers, plan_share_kv
from tests import kv_models

PAIRS = [(1, 0), (3, 2)]
SMALL_DATA = DataSettings(calib_tokens=256, valid_tokens=256, seq_len=32, batch_size=4)


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> kv_models.GenerationModels:
    return kv_models.shared(tmp_path_factory)


def _shared_torch(lm, pairs):
    """The torch model whose target layers take their sources' key/value projections."""
    model = lm.torch_model()
    captured: dict[tuple[int, str], object] = {}
    layers = model.model.layers
    for target, source in pairs:
        for name in ("k_proj", "v_proj"):

            def keep(module, args, output, key=(source, name)):
                captured[key] = output

            def reuse(module, args, output, key=(source, name)):
                return captured[key]

            getattr(layers[source].self_attn, name).register_forward_hook(keep)
            getattr(layers[target].self_attn, name).register_forward_hook(reuse)
    return model


def _write(lm, plan, folder):
    target = folder / "model.onnx"
    save_model(apply_plan(lm.export, plan), target)
    carry_manifest(lm.export, target)
    return target


def _plan(lm, pairs, align: bool = False) -> ShareKVPlan:
    return plan_share_kv(lm.export, ShareKVRequest(layers=pairs, align=align, data=SMALL_DATA))


def test_layers_are_found_by_dataflow(lm):
    layers = kv_layers(load_model(lm.export))
    assert len(layers) == kv_models.LAYERS
    for index, layer in enumerate(layers):
        assert layer.index == index and not layer.fused
        assert layer.key.past.name.endswith(f"{index}.key")
        assert layer.value.past.name.endswith(f"{index}.value")


def test_shared_kv_generates_what_torch_does_and_halves_the_cache(lm, tmp_path):
    path = _write(lm, _plan(lm, PAIRS), tmp_path / "shared")
    original, shared = load_model(lm.export), load_model(path)
    assert kv_bytes_per_token(paired_cache(shared.graph, "shared")) * 2 == kv_bytes_per_token(
        paired_cache(original.graph, "original")
    )
    projections = 2 * len(PAIRS) * kv_models.HIDDEN * kv_models.KV_HEADS * 16
    assert parameter_count(original) - parameter_count(shared) == projections
    prompts = lm.prompts(3)
    expected = kv_models.torch_greedy(
        _shared_torch(lm, PAIRS), prompts, kv_models.NEW_TOKENS, lm.tokenizer.pad_token_id
    )
    decoder = Decoder(path, provider="cpu")
    settings = {"max_new_tokens": kv_models.NEW_TOKENS, "suppress_eos": True}
    tokens = [generate_ids(decoder, [prompt], **settings).tokens[0] for prompt in prompts]
    assert tokens == expected
    assert expected != lm.torch_greedy(prompts)  # the sharing changes what the model says


def test_plan_round_trip_and_cli(lm, tmp_path, capsys):
    out = tmp_path / "cli" / "model.onnx"
    argv = ["share-kv", str(lm.export), "-o", str(out), "--layers", "1<-0,3<-2"]
    assert main([*argv, "--calib-tokens", "256", "--seq-len", "32"]) == 0
    saved = json.loads(out.with_suffix(".plan.json").read_text())
    assert saved["schema"] == "layerfuse.share-kv-plan/1"
    assert saved["pairs"] == [[1, 0], [3, 2]]
    assert [entry["pair"] for entry in saved["alignment"]["pairs"]] == [[1, 0], [3, 2]]
    again = tmp_path / "again" / "model.onnx"
    plan_file = str(out.with_suffix(".plan.json"))
    assert main(["share-kv", str(lm.export), "-o", str(again), "--plan", plan_file]) == 0
    assert again.read_bytes() == out.read_bytes()
    assert "KV cache per token" in capsys.readouterr().out


def test_the_planner_measures_similarity_and_scores_candidates(lm):
    plan = plan_share_kv(lm.export, ShareKVRequest(layers=1, data=SMALL_DATA))
    similarity = np.array(plan.similarity)
    assert similarity.shape == (kv_models.LAYERS, kv_models.LAYERS)
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-4)
    assert len(plan.pairs) == 1 and len(plan.validation["candidates"]) == kv_models.LAYERS - 1
    best = min(plan.validation["candidates"], key=lambda c: c["score"])
    assert plan.pairs == [tuple(best["pair"])]
    assert plan.validation["shared"] == pytest.approx(best["score"], rel=1e-5)


@pytest.mark.parametrize(
    ("pairs", "message"),
    (
        ([(0, 1)], "source < target"),
        ([(4, 1)], "source < target"),
        ([(2, 1), (1, 0)], "both shares another layer's cache and lends its own"),
        ([(2, 0), (2, 1)], "one other layer only"),
    ),
)
def test_impossible_pairs_are_refused(lm, pairs, message):
    with pytest.raises(PlanError, match=message):
        _plan(lm, pairs)


def test_a_fused_attention_graph_is_refused_with_the_reason(lm):
    with pytest.raises(PlanError, match="fused attention op"):
        plan_share_kv(lm.builder, ShareKVRequest(layers=[(1, 0)]))


def test_recover_trains_a_shared_kv_model_with_its_plan(lm, tmp_path, capsys):
    shared = tmp_path / "shared" / "model.onnx"
    assert main(["share-kv", str(lm.export), "-o", str(shared), "--layers", "1<-0"]) == 0
    out = tmp_path / "recovered" / "model.onnx"
    argv = ["recover", str(lm.export), str(shared), "-o", str(out), "--steps", "2"]
    settings = ["--batch-size", "2", "--grad-accum", "1", "--seq-len", "32", "--json"]
    plan = str(shared.with_suffix(".plan.json"))
    capsys.readouterr()
    assert main([*argv, *settings, "--valid-tokens", "256", "--plan", plan]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["finished"] and summary["verified_max_abs_diff"] < 1e-4
    recovered = load_model(out)
    assert len(kv_layers(recovered)) == kv_models.LAYERS - 1
    assert parameter_count(recovered) == parameter_count(load_model(shared))
