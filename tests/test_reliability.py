"""The bad-input battery: every command x every kind of broken model is one line, exit 2.

Each case runs with a good output already in place; a failure must leave its bytes and the
output folder exactly as they were (no partial file, no staging folder, no empty folder).
Damaged files beside a good model (manifest, baseline, text, repository, checkpoint) are in
``test_reliability_files.py``.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from layerfuse.cli import main
from layerfuse.model.io import load_model, save_model

BAD_KINDS = ("missing", "folder", "text", "random", "truncated", "no-data", "no-pattern")
# Commands that work on any graph: a graph without transformer blocks is valid input to them.
ANY_GRAPH = {"bench", "quantize"}


def _commands(model: Path, good: Path, out: Path) -> dict[str, list[str]]:
    onnx_out = str(out / "model.onnx")
    return {
        "inspect": ["inspect", str(model)],
        "merge": ["merge", str(model), "-o", onnx_out, "--blocks", "0-1"],
        "prune": ["prune", str(model), "-o", onnx_out, "--count", "1"],
        "fuse": ["fuse", str(model), "-o", onnx_out, "--drop-attention", "1"],
        "evaluate": ["evaluate", str(model), "--data", "random", "--eval-tokens", "64"],
        "analyze": ["analyze", str(model), "--out", str(out), "--data", "random"],
        "bench": ["bench", str(model), "--runs", "1", "--json", str(out / "bench.json")],
        "generate": ["generate", str(model), "--prompt", "hello", "--max-new-tokens", "2"],
        "recover": ["recover", str(good), str(model), "-o", onnx_out, "--steps", "1"],
        "quantize": ["quantize", str(model), "-o", onnx_out, "--int8"],
        "convert": ["convert", str(model), "-o", onnx_out, "--fp16"],
    }


def _no_pattern_model(path: Path) -> None:
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    onnx.save(helper.make_model(graph), path)


def _bad_model(kind: str, good: Path, folder: Path) -> Path:
    folder.mkdir(parents=True)
    path = folder / "model.onnx"
    if kind == "folder":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a model\n" * 50)
    elif kind == "random":
        path.write_bytes(hashlib.sha512(b"seed").digest() * 64)
    elif kind == "truncated":
        data = good.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "no-data":
        save_model(load_model(good), path, external_data=True)
        (folder / "model.onnx.data").unlink()
    elif kind == "no-pattern":
        _no_pattern_model(path)
    for name in ("layerfuse.json", "tokenizer"):
        source = good.parent / name
        if kind != "missing" and source.exists():
            copy = shutil.copytree if source.is_dir() else shutil.copy
            copy(source, folder / name)
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    } | {str(p.relative_to(folder)) + "/": "" for p in folder.rglob("*") if p.is_dir()}


@pytest.fixture(scope="module")
def good_model(tiny) -> Path:
    return tiny.model("llama")


COMMANDS = (
    "inspect",
    "merge",
    "prune",
    "fuse",
    "evaluate",
    "analyze",
    "bench",
    "generate",
    "recover",
    "quantize",
    "convert",
)
CASES = [
    (command, kind)
    for command in COMMANDS
    for kind in BAD_KINDS
    if not (kind == "no-pattern" and command in ANY_GRAPH)
]


@pytest.mark.parametrize(("command", "kind"), CASES)
def test_bad_model_is_one_line_and_touches_nothing(command, kind, good_model, tmp_path, capsys):
    model = _bad_model(kind, good_model, tmp_path / "in")
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.onnx").write_bytes(b"a previous result")
    (out / "bench.json").write_text('{"previous": true}\n')
    before = _snapshot(out)
    capsys.readouterr()
    status = main(_commands(model, good_model, out)[command])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2, err
    assert len(err) >= 1 and err[-1].startswith("layerfuse: error:"), err
    assert not any("Traceback" in line for line in err)
    assert _snapshot(out) == before


def test_an_output_that_is_an_input_is_refused(good_model, tmp_path, capsys):
    folder = tmp_path / "m"
    shutil.copytree(good_model.parent, folder)
    model = folder / "model.onnx"
    before = _snapshot(folder)
    for argv in (
        ["merge", str(model), "-o", str(model), "--blocks", "0-1"],
        ["merge", str(model), "-o", str(folder / "v.onnx"), "--plan-out", str(model)],
        ["bench", str(model), "--runs", "1", "--json", str(model)],
    ):
        capsys.readouterr()
        assert main(argv) == 2
        assert "which this command reads" in capsys.readouterr().err
    assert _snapshot(folder) == before


def test_a_failed_command_leaves_no_output_folder(good_model, tmp_path):
    target = tmp_path / "new" / "deeper" / "model.onnx"
    missing_text = tmp_path / "absent.txt"
    argv = ["recover", str(good_model), str(good_model), "-o", str(target), "--steps", "1"]
    assert main([*argv, "--data", str(missing_text)]) == 2
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize(
    "argv",
    (
        ["recover", "{m}", "{m}", "-o", "{o}", "--batch-size", "0"],
        ["recover", "{m}", "{m}", "-o", "{o}", "--seq-len", "0"],
        ["recover", "{m}", "{m}", "-o", "{o}", "--lr", "nan"],
        ["merge", "{m}", "-o", "{o}", "--seq-len", "0"],
        ["merge", "{m}", "-o", "{o}", "--calib-tokens", "0"],
        ["evaluate", "{m}", "--eval-tokens", "0"],
        ["evaluate", "{m}", "--eval-tokens", "-5"],
        ["generate", "{m}", "--prompt", "hi", "--threads", "-1"],
        ["bench", "{m}", "--runs", "0"],
        ["bench", "{m}", "--runs", "1", "--inputs", "1x100000"],
    ),
)
def test_meaningless_numbers_are_refused(argv, good_model, tmp_path, capsys):
    argv = [a.format(m=good_model, o=tmp_path / "o.onnx") for a in argv]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerfuse: error:"), err
    assert not (tmp_path / "o.onnx").exists()


@pytest.fixture(scope="module")
def saved_plan(good_model, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "model.onnx"
    argv = ["merge", str(good_model), "-o", str(out), "--blocks", "0-1", "--method", "vanilla"]
    assert main(argv) == 0
    return out.with_suffix(".plan.json")


def test_an_empty_plan_is_an_error_and_writes_nothing(good_model, saved_plan, tmp_path, capsys):
    import json

    empty = tmp_path / "empty.plan.json"
    empty.write_text(json.dumps(json.loads(saved_plan.read_text()) | {"windows": []}))
    capsys.readouterr()
    assert main(["merge", str(good_model), "-o", str(tmp_path / "o.onnx"), "--plan", str(empty)])
    assert "no windows" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.plan.json"]


def test_planning_options_with_a_saved_plan_are_refused(good_model, saved_plan, tmp_path, capsys):
    out = tmp_path / "o.onnx"
    for extra in (["--refit"], ["--calib-tokens", "99"], ["--ratio", "0.5"]):
        capsys.readouterr()
        argv = ["merge", str(good_model), "-o", str(out), "--plan", str(saved_plan), *extra]
        assert main(argv) == 2
        assert f"{extra[0]} cannot apply with --plan" in capsys.readouterr().err
    assert not out.exists()


def test_sizes_are_measured_on_the_written_files(good_model, saved_plan, tmp_path, capsys):
    from layerfuse.model.io import parameter_count

    out = tmp_path / "o.onnx"
    capsys.readouterr()
    assert main(["merge", str(good_model), "-o", str(out), "--plan", str(saved_plan)]) == 0
    printed = capsys.readouterr().out
    before, after = (parameter_count(load_model(p)) for p in (good_model, out))
    assert f"({(after - before) / before:+.1%})" in printed
