"""Loading rejects broken models with one clear line; saving never damages a good file."""

from __future__ import annotations

import shutil

import numpy as np
import onnx_ir as ir
import pytest

from layerfuse.cli import main
from layerfuse.errors import InvalidModelError
from layerfuse.model.io import load_model, save_model


def _data_file(path):
    return path.with_name(path.name + ".data")


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
    _data_file(path).unlink()
    message = _inspect_error(path, capsys)
    assert "external data file 'model.onnx.data' is missing" in message


def test_truncated_external_data(tiny, tmp_path, capsys):
    path = _model_with_external_data(tiny, tmp_path)
    data = _data_file(path)
    data.write_bytes(data.read_bytes()[:1000])
    assert "is truncated" in _inspect_error(path, capsys)


def test_external_data_outside_model_folder(tiny, tmp_path, capsys):
    import onnx

    inner = tmp_path / "inner"
    inner.mkdir()
    path = _model_with_external_data(tiny, inner)
    shutil.move(_data_file(path), tmp_path / "escaped.data")
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
    assert not _data_file(path).exists()
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


def _tensor_bytes(model) -> dict[str, bytes]:
    return {
        name: value.const_value.numpy().tobytes()
        for name, value in model.graph.initializers.items()
    }


def _perturbed(path):
    model = load_model(path)
    for value in model.graph.initializers.values():
        array = value.const_value.numpy()
        if array.dtype == np.float32 and array.size > 1:
            value.const_value = ir.tensor(array + 1.0, name=value.name)
    return model


def test_saving_over_a_graph_never_writes_the_data_another_graph_reads(tiny, tmp_path):
    # A user renamed model.onnx to orig.onnx and writes a variant to model.onnx: the variant's
    # weights must not land in model.onnx.data, which orig.onnx still reads.
    path = _model_with_external_data(tiny, tmp_path)
    orig = tmp_path / "orig.onnx"
    path.rename(orig)
    before = _tensor_bytes(load_model(orig))
    save_model(_perturbed(orig), path, external_data=True)
    assert _tensor_bytes(load_model(orig)) == before
    assert _tensor_bytes(load_model(path)) != before
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model.onnx",
        "model.onnx.1.data",
        "model.onnx.data",
        "orig.onnx",
    ]


def test_overwriting_a_model_in_place_drops_the_weights_nobody_reads(tiny, tmp_path):
    path = _model_with_external_data(tiny, tmp_path)
    for expected_data in ("model.onnx.1.data", "model.onnx.data"):
        save_model(_perturbed(path), path, external_data=True)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", expected_data]
        load_model(path)


def test_a_crash_between_the_renames_leaves_the_old_model_whole(tiny, tmp_path, monkeypatch):
    import os

    path = _model_with_external_data(tiny, tmp_path)
    before = _tensor_bytes(load_model(path))
    real_replace = os.replace

    def crash_on_graph_rename(src, dst):
        if str(dst) == str(path):
            raise KeyboardInterrupt("killed between the data and the graph rename")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", crash_on_graph_rename)
    with pytest.raises(KeyboardInterrupt):
        save_model(_perturbed(path), path, external_data=True)
    monkeypatch.setattr(os, "replace", real_replace)
    assert _tensor_bytes(load_model(path)) == before
    # The next save removes the orphaned generation and any staging folder left behind.
    save_model(load_model(path), tmp_path / "model.onnx", external_data=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.1.data"]


def test_staging_folders_of_dead_processes_are_removed(tiny, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    stale = tmp_path / f".layerfuse-save-{dead}-abc123"
    live = tmp_path / f".layerfuse-save-{__import__('os').getpid()}-def456"
    stale.mkdir()
    live.mkdir()
    save_model(load_model(tiny.model("llama")), tmp_path / "model.onnx")
    assert not stale.exists() and live.exists()
