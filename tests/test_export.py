"""Export: graphs equal torch within tolerance, or nothing is written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from layerfuse.cli import main
from layerfuse.data.batches import make_batches
from layerfuse.errors import LayerfuseError
from layerfuse.export import onnx_export, sources
from layerfuse.export.onnx_export import _VERIFY_TEXTS, example_inputs, export_model
from layerfuse.export.sources import load_source, resolve_source
from layerfuse.export.wrappers import wrap_for_export
from layerfuse.runtime.session import create_session
from tests import gguf_models


def test_export_writes_model_tokenizer_and_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "llama"
    assert main(["export", str(tiny.folder("llama")), "-o", str(out)]) == 0
    manifest = json.loads((out / "layerfuse.json").read_text())
    assert manifest["task"] == "causal-lm"
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["verification"]["max_abs_diff"] <= 1e-3
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert manifest["bos"] is False  # the tiny tokenizer has no BOS
    printed = capsys.readouterr().out
    assert "max |onnxruntime - torch|" in printed and "do not start with BOS" in printed


@pytest.mark.parametrize("family", ["gpt2", "vit"])
def test_torchscript_export_is_verified(tiny, family):
    path = tiny.model(family, "torchscript")
    manifest = json.loads((path.parent / "layerfuse.json").read_text())
    assert manifest["exporter"] == "torchscript"
    assert 0 < manifest["verification"]["max_abs_diff"] <= 1e-3


def test_out_of_tolerance_export_writes_nothing(tiny, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(LayerfuseError, match=r"differs from torch by .* nothing was written"):
        export_model(load_source(str(tiny.folder("bert"))), out, tolerance=0.0)
    assert list(out.iterdir()) == []


def test_unknown_source_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "layerfuse", "export", "no-such-model", "-o", str(tmp_path / "x")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        (
            "layerfuse: error: 'no-such-model' is not a packaged model (smollm2-135m, minilm-l6), "
            "a .gguf file or a folder with config.json"
        )
    ]
    assert not (tmp_path / "x").exists()


def test_left_padding_tokenizers_are_verified_on_valid_positions_only(tiny, tmp_path):
    folder = tmp_path / "left"
    shutil.copytree(tiny.folder("llama"), folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "left"}))
    source = load_source(str(folder))
    result = export_model(source, tmp_path / "out")
    assert result.max_abs_diff <= 1e-3
    inputs = example_inputs(source, _VERIFY_TEXTS, seed=1)
    mask = inputs["attention_mask"].numpy()
    assert mask[:, 0].min() == 0, "the verification batch must contain left padding"
    feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
    logits = create_session(result.model_path, provider="cpu").run(None, feeds)[0]
    with torch.no_grad():
        expected = wrap_for_export(source.model, source.task)(*inputs.values()).numpy()
    valid = mask.astype(bool)
    assert np.max(np.abs(logits[valid] - expected[valid])) == pytest.approx(result.max_abs_diff)


def test_exporter_failure_is_one_line_and_writes_nothing(tiny, tmp_path):
    source = load_source(str(tiny.folder("bert")))

    def untraceable(*args, **kwargs):
        raise RuntimeError("an op the exporter cannot trace\n  frame 1\n  frame 2")

    source.model.embeddings.forward = untraceable
    out = tmp_path / "broken"
    with pytest.raises(LayerfuseError) as failure:
        export_model(source, out)
    message = str(failure.value)
    assert message.startswith(f"the dynamo exporter failed on {source.name}: ")
    assert "\n" not in message and "--exporter torchscript" in message
    assert list(out.iterdir()) == []


def test_a_gguf_exports_as_a_causal_lm_fed_with_its_bos(tmp_path, capsys):
    gguf = gguf_models.write_tiny_llama(tmp_path / "tiny.gguf", add_bos=True)
    # transformers' config from a GGUF names no architectures; a GGUF is a causal LM anyway.
    assert resolve_source(str(gguf)).task == "causal-lm"
    out = tmp_path / "onnx"
    assert main(["export", str(gguf), "-o", str(out)]) == 0
    assert "note:" not in capsys.readouterr().out
    manifest = json.loads((out / "layerfuse.json").read_text())
    assert (manifest["task"], manifest["output"], manifest["bos"]) == ("causal-lm", "logits", True)
    model = out / "model.onnx"
    windows = make_batches(model, "fortunes", "test", tokens=256, seq_len=32)[0]
    assert (windows.feeds["input_ids"][:, 0] == gguf_models.BOS_ID).all()
    assert main(["evaluate", str(model), "--eval-tokens", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["metric"] == "perplexity" and result["bos"] is True
    # Random weights predict about uniformly over the 259 tokens.
    assert 0.5 * len(gguf_models.TOKENS) < result["perplexity"] < 2 * len(gguf_models.TOKENS)


def _without_architectures(tiny, tmp_path):
    folder = tmp_path / "no-architectures"
    shutil.copytree(tiny.folder("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    del config["architectures"]
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _never_load(monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the options should have been refused before loading weights")

    monkeypatch.setattr(sources, "_load_pretrained", load)


def test_wrong_export_options_are_refused_before_loading(tiny, tmp_path, monkeypatch, capsys):
    _never_load(monkeypatch)
    gguf = gguf_models.write_tiny_llama(tmp_path / "tiny.gguf", add_bos=False)
    bert, out = str(tiny.folder("bert")), str(tmp_path / "out")
    cases = [
        ([str(gguf), "--kv-cache", "--exporter", "torchscript"], "needs the dynamo exporter"),
        ([str(gguf), "--kv-cache", "--task", "encoder"], "causal LMs, but --task encoder"),
        ([bert, "--kv-cache"], "causal LMs, but the config of 'bert' says encoder"),
        ([bert, "--no-bos"], "--bos/--no-bos choose how causal LMs' text windows start"),
        ([str(gguf), "--opset", "17"], "opset 17 is too old"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        assert main(["export", *extra, "-o", out]) == 2
        (line,) = capsys.readouterr().err.strip().splitlines()
        assert message in line
    assert not (tmp_path / "out").exists()


def test_a_task_from_a_fallback_is_said_and_kv_cache_implies_causal_lm(
    tiny, tmp_path, monkeypatch, capsys
):
    folder = _without_architectures(tiny, tmp_path)
    fallback = resolve_source(str(folder))
    assert fallback.task == "encoder" and "names no architectures" in fallback.task_note
    assert resolve_source(str(folder), kv_cache=True).task == "causal-lm"
    assert resolve_source(str(folder), task="causal-lm").task_note is None

    def stop(*args, **kwargs):
        raise LayerfuseError("stopped where the weights would load")

    monkeypatch.setattr(sources, "_load_pretrained", stop)
    assert main(["export", str(folder), "-o", str(tmp_path / "out")]) == 2
    printed = capsys.readouterr().out
    assert "note: the config names no architectures, so the model is exported as an encoder" in (
        printed
    )


def test_no_bos_overrides_a_tokenizer_that_adds_bos(tmp_path, monkeypatch):
    gguf = gguf_models.write_tiny_llama(tmp_path / "tiny.gguf", add_bos=True)
    assert load_source(str(gguf)).bos is True
    exported = []

    def capture(source, *args, **kwargs):
        exported.append(source.bos)  # what export_model writes as the manifest's 'bos'
        raise LayerfuseError("stopped before exporting")

    monkeypatch.setattr(onnx_export, "export_model", capture)
    assert main(["export", str(gguf), "--no-bos", "-o", str(tmp_path / "out")]) == 2
    assert exported == [False]
