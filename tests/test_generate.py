"""Generation with a KV cache: export, the decode loop, sampling, onnxruntime-genai, errors."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.errors import DataError
from layerfuse.generate import Decoder, Sampling, generate_ids
from layerfuse.model.manifest import read_manifest
from tests import kv_models


@pytest.fixture(scope="session")
def lm(tmp_path_factory) -> kv_models.GenerationModels:
    return kv_models.shared(tmp_path_factory)


def _genai():
    return pytest.importorskip(
        "onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install .[genai])"
    )


def _greedy(decoder: Decoder, prompts, eos: int) -> list[list[int]]:
    result = generate_ids(
        decoder,
        prompts,
        max_new_tokens=kv_models.NEW_TOKENS,
        eos_token_ids=[eos],
        suppress_eos=True,
    )
    return result.tokens


def test_kv_export_is_verified_on_prefill_and_decode_and_recorded(lm):
    manifest = read_manifest(lm.export)
    assert manifest.verification["prefill_max_abs_diff"] < 1e-4
    assert manifest.verification["decode_max_abs_diff"] < 1e-4
    assert manifest.inputs == ["input_ids", "attention_mask", "position_ids"]
    geometry = {k: manifest.generation[k] for k in ("num_layers", "kv_heads", "head_dim")}
    assert geometry == {"num_layers": 4, "kv_heads": 2, "head_dim": 16}
    decoder = Decoder(lm.export, provider="cpu")
    names = sorted(entry.past.name for entry in decoder.entries)
    assert names == sorted(f"past_key_values.{i}.{kv}" for i in range(4) for kv in ("key", "value"))
    assert decoder.kv_bytes_per_token() == 4 * 2 * 2 * 16 * 4


def test_greedy_generation_matches_torch_generate_on_real_prompts(lm):
    prompts = lm.prompts()
    expected = lm.torch_greedy(prompts)
    eos = lm.tokenizer.eos_token_id
    for path in (lm.export, lm.builder):
        decoder = Decoder(path, provider="cpu")
        assert [_greedy(decoder, [p], eos)[0] for p in prompts] == expected, path
        # One padded batch: left padding with positions (export), right padding (builder).
        assert _greedy(decoder, prompts, eos) == expected, path


def test_onnxruntime_genai_generates_what_torch_does(lm):
    _genai()
    from layerfuse.generate.genai import GenaiGenerator

    prompts = lm.prompts(3)
    generator = GenaiGenerator(lm.builder.parent, threads=1)
    tokens = [
        generator.generate_ids([p], max_new_tokens=kv_models.NEW_TOKENS, suppress_eos=True)
        for p in prompts
    ]
    assert [t.tokens[0] for t in tokens] == lm.torch_greedy(prompts)


def test_sampling_is_seeded_and_top_p_narrows_to_greedy(lm):
    decoder = Decoder(lm.export, provider="cpu")
    prompt = lm.prompts(1)

    def run(sampling):
        return generate_ids(decoder, prompt, max_new_tokens=16, sampling=sampling).tokens[0]

    first = run(Sampling(sample=True, temperature=1.5, seed=7))
    assert run(Sampling(sample=True, temperature=1.5, seed=7)) == first
    assert run(Sampling(sample=True, temperature=1.5, seed=8)) != first
    # A nucleus smaller than the top token's probability keeps only that token.
    assert run(Sampling(sample=True, top_p=1e-9, seed=1)) == run(Sampling())


def test_cli_streams_the_generated_text(lm, capsys):
    prompt_ids = lm.prompts(1)[0]
    prompt = lm.tokenizer.decode(prompt_ids)
    args = ["generate", str(lm.export), "--prompt", prompt, "--max-new-tokens", "12"]
    assert main([*args, "--provider", "cpu"]) == 0
    captured = capsys.readouterr()
    decoder = Decoder(lm.export, provider="cpu")
    ids = lm.tokenizer(prompt)["input_ids"]
    tokens = generate_ids(
        decoder, [ids], max_new_tokens=12, eos_token_ids=[lm.tokenizer.eos_token_id]
    ).tokens[0]
    assert captured.out == lm.tokenizer.decode(tokens, skip_special_tokens=True) + "\n"
    assert "tokens (ort)" in captured.err


def test_cli_runs_the_builder_folder_in_onnxruntime_genai(lm, capsys):
    """Token equality is checked above; random weights produce invalid UTF-8 pieces, which
    onnxruntime-genai's stream drops and Hugging Face's decode shows as U+FFFD."""
    _genai()
    prompt = lm.tokenizer.decode(lm.prompts(1)[0])
    args = ["generate", str(lm.builder), "--prompt", prompt, "--max-new-tokens", "10"]
    assert main([*args, "--runtime", "genai", "--threads", "1"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip()
    assert "10 tokens (genai)" in captured.err


def _error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_inputs_are_one_clear_line(lm, tiny, capsys):
    too_long = " ".join(["the"] * kv_models.CONTEXT)
    assert main(["generate", str(lm.export), "--prompt", too_long, "--provider", "cpu"]) == 2
    assert "but the model's context is 256 tokens" in _error_line(capsys)
    no_cache = tiny.model("llama")
    capsys.readouterr()
    assert main(["generate", str(no_cache), "--prompt", "hello", "--provider", "cpu"]) == 2
    assert "has no KV-cache inputs" in _error_line(capsys)
    assert main(["generate", str(lm.export), "--prompt", "x", "--runtime", "genai"]) == 2
    assert "has no genai_config.json" in _error_line(capsys)
    args = ["generate", str(lm.export), "--prompt", "x", "--sample", "--top-p", "0"]
    assert main(args) == 2
    assert "top-p must be in (0, 1]" in _error_line(capsys)


def test_a_cache_of_the_wrong_shape_is_refused(lm):
    decoder = Decoder(lm.export, provider="cpu")
    ids = np.array([[5, 6, 7]], np.int64)
    cache = {e.past.name: np.zeros((1, 2, 4, 8), np.float32) for e in decoder.entries}
    with pytest.raises(DataError, match=r"has shape \[1, 2, 4, 8\]; .* need \[1, 2, 4, 16\]"):
        decoder.start(ids, np.ones((1, 7), np.int64), cache=cache)
    cache.pop(decoder.entries[0].past.name)
    with pytest.raises(DataError, match="the cache has no tensor for graph input"):
        decoder.start(ids, np.ones((1, 7), np.int64), cache=cache)


def test_a_prompt_continues_from_a_given_cache(lm):
    """Prefill in two parts (the second after the first's cache) == one prefill."""
    decoder = Decoder(lm.export, provider="cpu")
    prompt = np.array([lm.prompts(1)[0]], np.int64)
    whole = decoder.start(prompt, np.ones_like(prompt))
    decoder.start(prompt[:, :5], np.ones((1, 5), np.int64))
    rest = decoder.start(prompt[:, 5:], np.ones_like(prompt), cache=decoder.cache)
    np.testing.assert_allclose(rest, whole, atol=1e-5)


def test_builder_folder_is_read_without_writing_into_it(lm):
    folder = lm.builder.parent
    manifest = read_manifest(lm.builder)
    assert manifest.exporter == "onnxruntime-genai"
    assert manifest.tokenizer == "."
    assert manifest.generation["head_dim"] == 16
    assert manifest.generation["context_length"] == kv_models.CONTEXT
    assert not (folder / "layerfuse.json").exists()
    config = json.loads((folder / "genai_config.json").read_text())
    assert config["model"]["decoder"]["num_hidden_layers"] == kv_models.LAYERS


def test_decode_bench_times_every_target_on_the_same_prompts(lm):
    """The export, the builder graph in layerfuse's loop and in onnxruntime-genai compute one
    function, so every target's tokens equal the peer's; the cache size comes from the graph."""
    from layerfuse.data import corpus
    from layerfuse.generate.timing import DecodeCase, DecodeTarget, decode_prompts, run_decode_bench

    targets = [DecodeTarget("export", lm.export), DecodeTarget("builder", lm.builder)]
    if importlib.util.find_spec("onnxruntime_genai"):
        targets.append(DecodeTarget("genai", lm.builder, "genai"))
    cases = [DecodeCase(1, 24, 6, repeats=2), DecodeCase(3, 16, 4)]
    texts = corpus.split_texts("test")
    rows = run_decode_bench(  # the first case keeps all targets open, the second one at a time
        targets,
        cases,
        lambda c: decode_prompts(lm.tokenizer, texts, c.batch, c.context),
        threads=1,
        open_together=40,
    )
    assert [(r["target"], r["case"]) for r in rows] == [
        (t.name, c.label) for c in cases for t in targets
    ]
    for row in rows:
        assert row["tokens_equal_to_peer"] == 1.0, row
        assert row["kv_bytes_per_token"] == kv_models.LAYERS * 2 * kv_models.KV_HEADS * 16 * 4
        assert row["repeats"] == (2 if row["batch"] == 1 else 1)
        assert row["p90_token_ms"] >= row["p50_token_ms"] > 0
        assert row["batch_tokens_per_second"] == pytest.approx(
            row["tokens_per_second"] * row["batch"]
        )
    prompts = decode_prompts(lm.tokenizer, texts, 3, 16)
    assert [len(p) for p in prompts] == [16] * 3 and prompts[0] != prompts[1]
    with pytest.raises(DataError, match="are needed"):
        decode_prompts(lm.tokenizer, texts[:2], 4, 1000)


@pytest.mark.slow
def test_smollm2_greedy_generation_matches_torch_for_the_export_and_the_builder_graph(
    real, tmp_path_factory
):
    """32 greedy tokens on 5 real prompts: ``layerfuse export --kv-cache`` of the packaged
    model and onnxruntime-genai's builder graph of it, both through layerfuse's loop, equal
    torch's ``generate`` token for token."""
    import torch

    from layerfuse.data import corpus
    from layerfuse.export.genai_builder import build_genai_folder, save_hf_folder
    from layerfuse.export.onnx_export import export_model
    from layerfuse.generate.loop import token_ids

    source = real.source("smollm2-135m")
    root = tmp_path_factory.mktemp("smollm2-generation")
    graphs = [
        export_model(source, root / "kv", kv_cache=True).model_path,
        build_genai_folder(save_hf_folder(source, root / "hf"), root / "genai"),
    ]
    prompts = [source.tokenizer(t)["input_ids"][:24] for t in corpus.split_texts("test")[:5]]
    expected = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = source.model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=32,
                min_new_tokens=32,
                do_sample=False,
            )
        expected.append(out[0, len(prompt) :].tolist())
    eos = token_ids(source.model.generation_config.eos_token_id)
    for path in graphs:
        decoder = Decoder(path, provider="cpu")
        got = [
            generate_ids(
                decoder, [p], max_new_tokens=32, eos_token_ids=eos, suppress_eos=True
            ).tokens[0]
            for p in prompts
        ]
        assert got == expected, path
