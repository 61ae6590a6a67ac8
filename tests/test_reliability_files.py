"""Damaged files around a good model are one-line errors that write nothing: a manifest that
points outside its folder or is unreadable, a damaged bench baseline, calibration text that is
not UTF-8, a Triton repository with a broken sibling or that is a file, an incomplete
checkpoint; and atomic writes keep the umask's mode and leave no temporary file.

The battery of broken models themselves is ``test_reliability.py``.
"""

from __future__ import annotations

import shutil

import pytest

from layerfuse.cli import main
from tests.test_reliability import _snapshot, good_model  # noqa: F401


def test_a_manifest_cannot_reach_outside_its_folder(good_model, tmp_path, capsys):  # noqa: F811
    import json

    folder = tmp_path / "m"
    shutil.copytree(good_model.parent, folder)
    manifest = folder / "layerfuse.json"
    manifest.write_text(json.dumps(json.loads(manifest.read_text()) | {"tokenizer": "../.."}))
    out = tmp_path / "out" / "model.onnx"
    capsys.readouterr()
    assert main(["merge", str(folder / "model.onnx"), "-o", str(out), "--blocks", "0-1"]) == 2
    assert "points outside the model folder" in capsys.readouterr().err
    manifest.write_text("[]")
    assert main(["evaluate", str(folder / "model.onnx")]) == 2
    assert "unreadable manifest" in capsys.readouterr().err
    assert not out.parent.exists()


@pytest.mark.parametrize(
    "baseline", (b"\x89PNG\r\n\x1a\n\x00\xff", b"[1, 2]", b'{"schema": "layerfuse.bench/1"}')
)
def test_a_damaged_baseline_is_refused_before_anything_is_written(
    good_model,  # noqa: F811
    tmp_path,
    capsys,
    baseline,
):
    previous = tmp_path / "out.json"
    previous.write_text('{"previous": true}\n')
    damaged = tmp_path / "baseline.json"
    damaged.write_bytes(baseline)
    capsys.readouterr()
    argv = ["bench", str(good_model), "--runs", "1", "--json", str(previous)]
    assert main([*argv, "--baseline", str(damaged)]) == 2
    assert capsys.readouterr().err.startswith("layerfuse: error: baseline")
    assert previous.read_text() == '{"previous": true}\n'


@pytest.mark.parametrize("command", ("evaluate", "recover"))
def test_text_that_is_not_utf8_is_one_line(command, good_model, tmp_path, capsys):  # noqa: F811
    data = tmp_path / "latin1.txt"
    data.write_bytes("caf\xe9 au lait\n\nd\xe9j\xe0 vu\n".encode("latin-1"))
    argv = {
        "evaluate": ["evaluate", str(good_model)],
        "recover": ["recover", str(good_model), str(good_model), "-o", str(tmp_path / "r.onnx")],
    }[command]
    capsys.readouterr()
    assert main([*argv, "--data", str(data)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err


def test_deploy_next_to_a_broken_sibling_writes_nothing(good_model, tmp_path, capsys):  # noqa: F811
    repo = tmp_path / "repo"
    argv = ["deploy", "triton", str(good_model), "--repo", str(repo), "--name"]
    assert main([*argv, "first"]) == 0
    shutil.rmtree(repo / "first" / "1")  # a sibling without its version folder
    before = _snapshot(repo)
    capsys.readouterr()
    assert main([*argv, "second"]) == 2
    assert "no numeric version folder" in capsys.readouterr().err
    assert _snapshot(repo) == before


def test_deploy_into_a_file_is_one_line(good_model, tmp_path, capsys):  # noqa: F811
    repo = tmp_path / "repo"
    repo.write_text("not a folder")
    capsys.readouterr()
    assert main(["deploy", "triton", str(good_model), "--repo", str(repo), "--name", "m"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a file" in err[0]
    assert repo.read_text() == "not a folder"


def test_a_checkpoint_missing_keys_is_one_error(tmp_path):
    import torch

    from layerfuse.errors import LayerfuseError
    from layerfuse.recover.checkpoint import load_state

    path = tmp_path / "state.pt"
    torch.save({"params": {}}, path)
    with pytest.raises(LayerfuseError, match="missing optimizer"):
        load_state(path, ("params", "optimizer"))
    torch.save([1, 2], path)
    with pytest.raises(LayerfuseError, match="not a complete layerfuse checkpoint"):
        load_state(path)


def test_atomic_text_keeps_the_umask_mode_and_leaves_no_temporary(tmp_path):
    import os
    import stat

    from layerfuse.files import write_text_atomic

    target = write_text_atomic(tmp_path / "plan.json", "{}\n")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["plan.json"]


def test_a_full_disk_is_one_line_and_publishes_nothing(good_model, tmp_path, capsys, monkeypatch):  # noqa: F811
    """The disk fills while the weights are written: the staged half file is removed, the
    error names the machine's limit (not a layerfuse bug), and the output folder stays empty."""
    import errno

    import onnx_ir as ir

    from layerfuse.model import io

    def half_written(model, path, **options):
        path.write_bytes(b"\x08\x09" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(io.ir, "save", half_written)
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["merge", str(good_model), "-o", str(out / "model.onnx"), "--blocks", "0-1"]) == 3
    err = capsys.readouterr().err
    (error,) = [line for line in err.splitlines() if line.startswith("layerfuse: error")]
    assert "no space left on the device" in error and "layerfuse bug" not in error
    assert "Traceback" not in err
    assert sorted(p.name for p in out.rglob("*") if p.is_file()) == []
    assert ir.save is half_written
