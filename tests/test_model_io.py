"""Loading rejects broken models with one clear line; saving never damages a good file."""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import pytest

from layerfuse.cli import main
from layerfuse.errors import InvalidModelError
from layerfuse.model.io import external_data_path, load_model, save_model


def _inspect_error(path, capsys) -> str:
    capsys.readouterr()
    assert main(["inspect", str(path)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_truncated_file(tiny, tmp_path, capsys):
    data = tiny.model("llama").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidModelError):
        load_model(path)
    assert "not a valid ONNX file" in _inspect_error(path, capsys)


def test_not_onnx(tmp_path, capsys):
    path = tmp_path / "notes.onnx"
    path.write_text("this is a text file, not a protobuf\n" * 20)
    assert _inspect_error(path, capsys).startswith("layerfuse: error:")


def test_missing_file(tmp_path, capsys):
    assert "no such file" in _inspect_error(tmp_path / "absent.onnx", capsys)


def _model_with_external_data(tiny, tmp_path):
    model = load_model(tiny.model("bert"))
    path = tmp_path / "model.onnx"
    save_model(model, path, external_data=True)
    return path


def test_missing_external_data(tiny, tmp_path, capsys):
    path = _model_with_external_data(tiny, tmp_path)
    external_data_path(path).unlink()
    message = _inspect_error(path, capsys)
    assert "external data file 'model.onnx.data' is missing" in message


def test_truncated_external_data(tiny, tmp_path, capsys):
    path = _model_with_external_data(tiny, tmp_path)
    data = external_data_path(path)
    data.write_bytes(data.read_bytes()[:1000])
    assert "is truncated" in _inspect_error(path, capsys)


def test_external_data_outside_model_folder(tiny, tmp_path, capsys):
    import onnx

    inner = tmp_path / "inner"
    inner.mkdir()
    path = _model_with_external_data(tiny, inner)
    shutil.move(external_data_path(path), tmp_path / "escaped.data")
    proto = onnx.load(path, load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../escaped.data"
    onnx.save(proto, path)
    assert "outside the model folder" in _inspect_error(path, capsys)


def test_save_round_trip_and_inline_small_models(tiny, tmp_path):
    original = load_model(tiny.model("llama"))
    path = save_model(original, tmp_path / "copy.onnx")
    assert not external_data_path(path).exists()
    copy = load_model(path)
    for name, value in original.graph.initializers.items():
        np.testing.assert_array_equal(
            copy.graph.initializers[name].const_value.numpy(), value.const_value.numpy()
        )


def test_failed_save_keeps_the_previous_file(tiny, tmp_path, monkeypatch):
    path = save_model(load_model(tiny.model("llama")), tmp_path / "model.onnx")
    before = path.read_bytes()

    def broken_save(model, target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ir, "save", broken_save)
    with pytest.raises(OSError):
        save_model(load_model(path), path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
