"""What quantize and convert leave on disk and on the terminal: a valid model or nothing new,
an existing output untouched when a conversion fails, and none of onnxruntime's chatter."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from layerfuse.cli import main
from layerfuse.errors import InvalidModelError
from layerfuse.model.io import load_model, save_model
from layerfuse.runtime.inputs import parse_shapes, synthetic_feeds
from layerfuse.runtime.session import create_session
from layerfuse.toolchain import convert as convert_module
from layerfuse.toolchain import convert_fp16, quantize_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _folder_digest(folder) -> dict[str, str]:
    """Every entry of ``folder`` (hidden staging folders included) with its content hash."""
    return {
        entry.name: hashlib.sha256(entry.read_bytes()).hexdigest() if entry.is_file() else "dir"
        for entry in sorted(folder.iterdir())
    }


@pytest.mark.parametrize("family", ["vit", "deit"])
def test_fp16_of_a_float_input_graph_is_valid_and_matches_fp32(tiny, tmp_path, family):
    # The converter appends the Cast after pixel_values at the end of the graph: before the
    # sort in run_conversion, the output failed validation ("not topologically sorted").
    source = tiny.model(family)
    out = tmp_path / "fp16" / "model.onnx"
    assert main(["convert", str(source), "-o", str(out), "--fp16"]) == 0
    load_model(out)  # onnx.checker: sorted, typed, loadable
    model = onnx.load(out)
    assert [i.type.tensor_type.elem_type for i in model.graph.input] == [onnx.TensorProto.FLOAT]
    floats = [i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT]
    assert floats == []
    feeds = synthetic_feeds(source, parse_shapes("2x16")[0])
    reference = create_session(source, provider="cpu").run(None, feeds)[0]
    converted = create_session(out, provider="cpu").run(None, feeds)[0]
    assert converted.dtype == np.float32 and converted.shape == reference.shape
    # fp16 keeps ~3 decimal digits: 5e-4 relative error measured on the tiny ViT.
    error = np.linalg.norm(converted - reference) / np.linalg.norm(reference)
    assert 0 < error <= 5e-3
    assert np.abs(converted - reference).max() <= 1e-2 * np.abs(reference).max()


def test_a_conversion_that_fails_validation_leaves_the_existing_output_as_it_was(
    tiny, tmp_path, monkeypatch, capsys
):
    source = tiny.model("llama")
    out = tmp_path / "out" / "model.onnx"
    # An earlier result with external data: graph and weights must both survive.
    save_model(load_model(source), out, external_data=True)
    before = _folder_digest(out.parent)
    assert "model.onnx.data" in before

    def invalid(staged):
        raise InvalidModelError(f"{staged}: invalid ONNX model (injected)")

    monkeypatch.setattr(convert_module, "validate_staged", invalid)
    capsys.readouterr()
    assert main(["convert", str(source), "-o", str(out), "--fp16"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "not a valid model (invalid ONNX model (injected))" in error[0]
    assert f"{out} left as it was" in error[0]
    assert _folder_digest(out.parent) == before
    # A new output folder is not left behind empty either.
    fresh = tmp_path / "new" / "deeper" / "model.onnx"
    assert main(["quantize", str(source), "-o", str(fresh), "--int4"]) == 2
    assert not (tmp_path / "new").exists()

    monkeypatch.undo()
    result = convert_fp16(source, out)
    load_model(out)
    assert result.unique_bytes < result.source_unique_bytes
    # Replaced in place: the old weights file, which no graph reads any more, is gone too.
    assert sorted(_folder_digest(out.parent)) == ["layerfuse.json", "model.onnx", "tokenizer"]


def test_fp16_of_an_fp16_model_is_one_line(tiny, tmp_path, capsys):
    first = convert_fp16(tiny.model("llama"), tmp_path / "fp16" / "model.onnx").path
    capsys.readouterr()
    again = tmp_path / "again" / "model.onnx"
    assert main(["convert", str(first), "-o", str(again), "--fp16"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"layerfuse: error: {first} has no float32 weights to convert (is already float16); "
        "nothing written"
    ]
    assert not again.parent.exists()


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_quantize_prints_layerfuse_lines_and_nothing_from_the_quantizer(tiny, tmp_path, scheme):
    # In a fresh process, as a user runs it: importing MatMulNBitsQuantizer installs an INFO
    # handler on the root logger (one line per node), quantize_dynamic warns on the root logger.
    out = tmp_path / scheme / "model.onnx"
    command = [sys.executable, "-m", "layerfuse", "quantize", str(tiny.model("llama"))]
    done = subprocess.run(
        [*command, "-o", str(out), f"--{scheme}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith(f"wrote {out} ({scheme});")


def test_quantizer_logging_is_silenced_and_the_root_logger_restored(tiny, tmp_path, caplog):
    root = logging.getLogger()
    handlers = list(root.handlers)
    caplog.set_level(logging.DEBUG)
    quantize_model(tiny.model("llama"), tmp_path / "int4" / "model.onnx", "int4")
    quantize_model(tiny.model("llama"), tmp_path / "int8" / "model.onnx", "int8")
    from_onnxruntime = [
        record
        for record in caplog.records
        if record.name.startswith("onnxruntime") or "onnxruntime" in record.pathname
    ]
    assert from_onnxruntime == []
    assert root.handlers == handlers and root.level == logging.DEBUG
    assert logging.getLogger("onnxruntime").level == logging.NOTSET
