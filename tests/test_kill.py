"""SIGKILL at any moment never leaves a damaged output, and the next run cleans up after it.

A killed process cannot clean up, so what it leaves is at most a staging folder named after
its (now dead) process id: the previous output is intact or the new one is complete, and the
next run into the folder removes the leftovers.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerfuse.model.io import load_model

# Kill points: seconds after start, spread over loading, planning and writing.
KILL_AFTER = (1.0, 2.5, 4.0, 6.0)


def _layerfuse(*argv: str) -> list[str]:
    return [sys.executable, "-m", "layerfuse", *argv]


def _kill_after(argv: list[str], seconds: float) -> int | None:
    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(seconds)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    return process.wait()


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _check_folder(folder: Path, previous: str) -> None:
    """The output is the previous bytes or a complete model; only staging may be left."""
    output = folder / "model.onnx"
    if _digest(output) != previous:
        load_model(output)
    leftovers = [p.name for p in folder.iterdir() if p.name.startswith(".layerfuse-")]
    assert all(p.startswith((".layerfuse-save-", ".layerfuse-recover-")) for p in leftovers)


@pytest.fixture
def previous_output(tiny, tmp_path) -> tuple[Path, str]:
    """An output folder holding a good earlier result (a copy of the tiny model)."""
    folder = tmp_path / "out"
    folder.mkdir()
    output = folder / "model.onnx"
    output.write_bytes(tiny.model("llama").read_bytes())
    return folder, _digest(output)


@pytest.mark.parametrize("seconds", KILL_AFTER)
def test_killed_merge(tiny, previous_output, seconds):
    folder, previous = previous_output
    argv = _layerfuse(
        "merge", str(tiny.model("llama")), "-o", str(folder / "model.onnx"),
        "--blocks", "0-1", "--data", "random", "--calib-tokens", "256",
    )  # fmt: skip
    _kill_after(argv, seconds)
    _check_folder(folder, previous)
    assert subprocess.run(argv, check=False, capture_output=True).returncode == 0
    load_model(folder / "model.onnx")
    assert not [p for p in folder.iterdir() if p.name.startswith(".layerfuse-")]


@pytest.mark.parametrize("seconds", KILL_AFTER[1::2])
def test_killed_recover(tiny, previous_output, seconds):
    folder, previous = previous_output
    original = tiny.model("llama")
    argv = _layerfuse(
        "recover", str(original), str(original), "-o", str(folder / "model.onnx"),
        "--steps", "4", "--batch-size", "2", "--grad-accum", "1", "--seq-len", "32",
        "--eval-every", "2", "--valid-tokens", "128",
    )  # fmt: skip
    _kill_after(argv, seconds)
    _check_folder(folder, previous)
    resumed = subprocess.run([*argv, "--resume"], check=False, capture_output=True, text=True)
    if resumed.returncode != 0:  # killed before the first checkpoint: start afresh
        assert "nothing to resume" in resumed.stderr
        assert subprocess.run(argv, check=False, capture_output=True).returncode == 0
    load_model(folder / "model.onnx")
    assert not [p for p in folder.iterdir() if p.name.startswith(".layerfuse-")]
