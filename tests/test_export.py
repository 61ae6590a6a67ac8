"""Export: graphs equal torch within tolerance, or nothing is written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from layerfuse.cli import main
from layerfuse.errors import LayerfuseError
from layerfuse.export.onnx_export import export_model
from layerfuse.export.sources import load_source


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
