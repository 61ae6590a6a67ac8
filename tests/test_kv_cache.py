"""Passes on KV-cache graphs: torch exports and onnxruntime-genai builder graphs.

The two graphs of :mod:`tests.kv_models` compute the same function through different ops
(MatMul/Softmax/Concat vs GroupQueryAttention and fused residual norms), so the same rewrite
applied to both must give the same logits; torch with attention sublayers zeroed is the
reference for attention removal.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerfuse.cli import main
from layerfuse.generate import Decoder, generate_ids
from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan, FuseRequest, plan_fuse
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PrunePlan, PruneRequest, plan_prune
from layerfuse.passes.unfuse import unfuse_residual_norms
from layerfuse.runtime.calibration import adapt_feeds
from layerfuse.runtime.evaluate import evaluate_model
from layerfuse.runtime.session import create_session
from tests import kv_models

SMALL_DATA = DataSettings(calib_tokens=512, valid_tokens=512, seq_len=32, provider="cpu")


@pytest.fixture(scope="session")
def lm(tmp_path_factory) -> kv_models.GenerationModels:
    return kv_models.shared(tmp_path_factory)


def _graphs(lm):
    return {"export": lm.export, "builder": lm.builder}


def _variant(source, plan, path):
    save_model(apply_plan(source, plan), path)
    carry_manifest(source, path)
    return path


def _prune_attention(source, blocks, path):
    structure = detect_structure(load_model(source))
    plan = PrunePlan(structure.fingerprint, len(structure.blocks), "attention", blocks)
    return _variant(source, plan, path)


def _prefill_logits(path, ids: np.ndarray) -> np.ndarray:
    session = create_session(path, provider="cpu")
    feeds = adapt_feeds(session, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return session.run(None, feeds)[0]


def _greedy(lm, path, prompts):
    decoder = Decoder(path, provider="cpu")
    eos = [lm.tokenizer.eos_token_id]
    return generate_ids(
        decoder, prompts, max_new_tokens=kv_models.NEW_TOKENS, eos_token_ids=eos, suppress_eos=True
    ).tokens


def test_removing_attention_removes_exactly_its_cache(lm, tmp_path):
    prompts = lm.prompts(3)
    expected = lm.torch_greedy(prompts, drop_attention=(1,))
    for name, source in _graphs(lm).items():
        pruned = _prune_attention(source, [1], tmp_path / name / "model.onnx")
        before, after = Decoder(source, provider="cpu"), Decoder(pruned, provider="cpu")
        assert len(after.entries) == len(before.entries) - 2
        pasts = sorted(entry.past.name for entry in after.entries)
        presents = sorted(entry.present.name for entry in after.entries)
        layers = range(kv_models.LAYERS - 1)
        assert pasts == sorted(
            f"past_key_values.{i}.{kv}" for i in layers for kv in ("key", "value")
        )
        assert presents == [p.replace("past_key_values", "present") for p in pasts]
        # The K/V projections feeding only the cache go too, and so does the attention's norm.
        block = detect_structure(load_model(source)).blocks[1]
        removed = (
            block.attention.parameter_count + block.attention_wiring.norm.weight.const_value.size
        )
        assert parameter_count(load_model(source)) - parameter_count(load_model(pruned)) == removed
        assert _greedy(lm, pruned, prompts) == expected, name


@pytest.mark.parametrize("blocks", [[0], [0, 1, 2, 3]])
def test_attention_removal_matches_torch_on_both_graphs(lm, tmp_path, blocks):
    """Layer 0's cache is where the torch export reads the past length; with every attention
    gone no cache is left at all."""
    ids = np.array([lm.prompts(1)[0]], np.int64)
    model = lm.torch_model(drop_attention=tuple(blocks))
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    tokens = []
    for name, source in _graphs(lm).items():
        pruned = _prune_attention(source, blocks, tmp_path / name / "model.onnx")
        np.testing.assert_allclose(_prefill_logits(pruned, ids), expected, atol=1e-4)
        if len(blocks) == kv_models.LAYERS:
            with pytest.raises(Exception, match="no KV-cache inputs"):
                Decoder(pruned, provider="cpu")
        else:
            tokens.append(_greedy(lm, pruned, [ids[0].tolist()]))
    assert all(t == tokens[0] for t in tokens)


def test_fused_model_kv_bytes_per_token_drop_by_the_removed_share(lm, tmp_path):
    prompts = lm.prompts(2)
    results = {}
    for name, source in _graphs(lm).items():
        structure = detect_structure(load_model(source))
        plan = FusePlan(structure.fingerprint, len(structure.blocks), [1, 2], [(0, 2)])
        fused = _variant(source, plan, tmp_path / name / "model.onnx")
        original, variant = Decoder(source, provider="cpu"), Decoder(fused, provider="cpu")
        assert variant.kv_bytes_per_token() * 4 == original.kv_bytes_per_token() * 2
        eos = [lm.tokenizer.eos_token_id]
        live = [
            generate_ids(d, prompts, max_new_tokens=8, eos_token_ids=eos, suppress_eos=True)
            for d in (original, variant)
        ]
        assert live[1].cache_bytes * 4 == live[0].cache_bytes * 2
        results[name] = (live[1].tokens, _prefill_logits(fused, np.array([prompts[0]])))
    assert results["export"][0] == results["builder"][0]
    np.testing.assert_allclose(results["export"][1], results["builder"][1], atol=1e-4)


def test_planners_calibrate_and_score_cache_graphs(lm, tmp_path):
    """Calibration, influence and validation perplexity all run on an empty cache."""
    outputs = {}
    for name, source in _graphs(lm).items():
        merge = plan_merge(source, MergeRequest(ranges=[(1, 2)], method="vanilla", data=SMALL_DATA))
        merged = _variant(source, merge, tmp_path / name / "merged.onnx")
        outputs[name] = _prefill_logits(merged, np.array([lm.prompts(1)[0]]))
        prune = plan_prune(source, PruneRequest(target="attention", count=1, data=SMALL_DATA))
        assert len(prune.selection["scores"]) == kv_models.LAYERS
        request = FuseRequest(drop_attention=1, include_last=True, data=SMALL_DATA)
        fuse = plan_fuse(source, request)
        assert len(fuse.drop_attention) == 1 and fuse.baseline_score > 1
    np.testing.assert_allclose(outputs["export"], outputs["builder"], atol=1e-4)
    permuted = plan_merge(lm.export, MergeRequest(ranges=[(0, 2)], data=SMALL_DATA))
    assert sorted(permuted.windows[0].permutations) == [1, 2]


def test_evaluate_and_bench_run_on_cache_graphs(lm, tmp_path, capsys):
    scores = [
        evaluate_model(path, tokens=1024, seq_len=64, provider="cpu", latency_runs=1)
        for path in (lm.export, lm.builder)
    ]
    assert scores[0]["perplexity"] == pytest.approx(scores[1]["perplexity"], rel=1e-4)
    pruned = _prune_attention(lm.export, [2], tmp_path / "pruned" / "model.onnx")
    out = tmp_path / "bench.json"
    args = ["bench", str(lm.export), str(pruned), "--inputs", "1x16", "--runs", "3"]
    assert main([*args, "--no-memory", "--provider", "cpu", "--json", str(out)]) == 0
    graphs = json.loads(out.read_text())["graphs"]
    assert graphs[1]["stats"]["parameters"] < graphs[0]["stats"]["parameters"]


def test_optimized_builder_folders_run_in_onnxruntime_genai(lm, tmp_path, capsys):
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    from layerfuse.generate.genai import GenaiGenerator

    source = str(lm.builder)
    variants = {
        "pruned": ["prune", source, "--target", "attention", "--blocks", "1"],
        "fused": ["fuse", source, "--drop-attention", "1,2", "--runs", "0-2"],
        "merged": ["merge", source, "--blocks", "1-2", "--method", "vanilla"],
        "no-attention": ["prune", source, "--target", "attention", "--blocks", "0-3"],
    }
    prompts = lm.prompts(2)
    for name, command in variants.items():
        path = tmp_path / name / "model.onnx"
        assert main([*command, "-o", str(path), "--calib-tokens", "512", "--seq-len", "32"]) == 0
        config = json.loads((path.parent / "genai_config.json").read_text())["model"]["decoder"]
        assert config["filename"] == "model.onnx"
        layers = config["num_hidden_layers"]
        assert (path.parent / "tokenizer.json").is_file()
        generator = GenaiGenerator(path.parent, threads=1)
        through_genai = [
            generator.generate_ids([p], max_new_tokens=16, suppress_eos=True).tokens[0]
            for p in prompts
        ]
        assert [len(tokens) for tokens in through_genai] == [16] * len(prompts), name
        if layers:
            decoder = Decoder(path, provider="cpu")
            assert len(decoder.entries) == 2 * layers
            eos = [lm.tokenizer.eos_token_id]
            loop = generate_ids(
                decoder, prompts, max_new_tokens=16, eos_token_ids=eos, suppress_eos=True
            )
            assert through_genai == loop.tokens, name
        if name == "pruned":
            expected = lm.torch_greedy(prompts, drop_attention=(1,))
            assert through_genai == [row[:16] for row in expected]


def test_split_residual_norms_compute_what_the_fused_ones_did(lm):
    model = load_model(lm.builder)
    fused = sum(node.op_type.startswith("Skip") for node in model.graph)
    assert unfuse_residual_norms(model) == fused == 2 * kv_models.LAYERS
    assert not any(node.op_type.startswith("Skip") for node in model.graph)
    ids = np.array([lm.prompts(1)[0]], np.int64)
    from layerfuse.runtime.session import session_for_ir

    session = session_for_ir(model, lm.builder.parent, provider="cpu")
    feeds = adapt_feeds(session, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(
        session.run(None, feeds)[0], _prefill_logits(lm.builder, ids), atol=1e-5
    )


def test_int4_builder_graphs_are_refused_with_the_reason_and_nothing_written(lm, tmp_path, capsys):
    """Merging an int4 graph would dequantize and quantize its weights a second time."""
    pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
    int4 = lm.build("int4")
    output = tmp_path / "merged" / "model.onnx"
    args = ["merge", str(int4), "-o", str(output), "--blocks", "1-2", "--method", "vanilla"]
    assert main(args) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    linears = 5 * kv_models.LAYERS + 1  # q|k|v, o, gate, up, down per layer and the LM head
    assert f"linear layers are quantized ({linears} MatMulNBits" in lines[0]
    assert "optimize the float graph (builder -p fp32) and quantize the result once" in lines[0]
    assert not output.parent.exists()
