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
from layerfuse.errors import LayerfuseError
from layerfuse.export.onnx_export import _VERIFY_TEXTS, example_inputs, export_model
from layerfuse.export.sources import load_source
from layerfuse.export.wrappers import wrap_for_export
from layerfuse.runtime.session import create_session


def test_export_writes_model_tokenizer_and_manifest(tiny, tmp_path, capsys):
    out = tmp_path / "llama"
    assert main(["export", str(tiny.folder("llama")), "-o", str(out)]) == 0
    manifest = json.loads((out / "layerfuse.json").read_text())
    assert manifest["task"] == "causal-lm"
    assert manifest["inputs"] == ["input_ids", "attention_mask"]
    assert manifest["verification"]["max_abs_diff"] <= 1e-3
    assert (out / "tokenizer" / "tokenizer.json").is_file()
    assert "max |onnxruntime - torch|" in capsys.readouterr().out


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
