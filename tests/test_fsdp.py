"""Sharded recovery (``--parallel fsdp``): 2 CPU processes on gloo against 1 process and DDP.

The tiny Llama (4 blocks, width 32) with FFs 1-3 tied, as in ``test_recover.py``, trained 4
steps of 2 accumulated micro-batches (next-token loss, lr 1e-2, so validation improves and
the best parameters are the last) with validation, best.pt and state.pt every 2 steps, and a
gradient clip small enough to act. All 2-process runs share one spawn.

Tolerances: AdamW moves every weight by about lr a step, 3e-2 in 4 steps here. Two
processes sum each half batch and average the halves, one process sums the whole batch: the
float32 rounding differs by ~1e-7 relative, which AdamW's division by the root of the second
moment amplifies; 2-process runs (DDP and FSDP alike) end up to 6e-6 from the 1-process
run, so ``ONE_PROCESS`` is 2e-5 (3x margin, 1/1500 of the update). FSDP and DDP both
average over the same two halves and differ only in the reduction's order: up to 4e-7, so
``DDP`` is 2e-6. A gradient clipped per shard rather than by the global norm, a shard
written back in the wrong place or a frozen weight trained fails these by orders of magnitude.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from layerfuse.data.batches import make_batches
from layerfuse.errors import LayerfuseError
from layerfuse.model.io import load_model
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.sharding import block_boundaries, local, shard
from tests.test_recover import (
    Models,
    _cli,
    _free_port,
    _merged,
    _recover,
    _weights,
    _write_text,
)

ONE_PROCESS, DDP = 2e-5, 2e-6
OPTIONS = {
    "objective": "lm",
    "settings": {"grad_accum": 2, "eval_every": 2, "clip": 0.05, "lr": 1e-2},
}
TOUCHED = {"objective": "kd+hidden", "train": "touched", "settings": {"lr": 1e-2}}


def _probe(models: Models, output: Path) -> None:
    """Shard the student by hand: each process's share of every unit, and a forward's
    difference to the unsharded student's."""
    dist.init_process_group("gloo")
    merged = load_model(models.merged)
    whole, student = GraphModule(merged), GraphModule(merged)
    student.partition(block_boundaries(merged))
    shard(student, torch.device("cpu"), 2)
    batch = make_batches(models.original, str(models.text), "valid", tokens=64, seq_len=16)[0]
    feeds = {name: torch.from_numpy(batch.feeds[name]) for name in whole.input_names}
    with torch.no_grad():
        difference = (student(feeds)[0][0] - whole(feeds)[0][0]).abs().max()
    student.reshard()  # the root unit stays whole after a forward without backward
    record = {
        "units": [[w.numel(), local(w).numel()] for u in student.units for w in u.weights],
        "shared": [[w.numel(), local(w).numel()] for w in student.shared],
        "unit_weights": [len(unit.names) for unit in student.units],
        "difference": float(difference),
    }
    output.with_name(f"{output.stem}.{dist.get_rank()}.json").write_text(json.dumps(record))
    dist.destroy_process_group()


def _run(models: Models, output: Path, options: dict) -> None:
    summary = _recover(models, output, **options)
    if int(os.environ["RANK"]) == 0:
        output.with_suffix(".json").write_text(json.dumps(summary, default=str))


def _worker(rank: int, jobs: list[tuple], ports: list[int]) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    torch.set_num_threads(1)
    for port, (job, *args) in zip(ports, jobs, strict=True):
        os.environ["MASTER_PORT"] = str(port)
        job(*args)


@pytest.fixture(scope="module")
def runs(tiny, tmp_path_factory) -> tuple[Models, Models, Path]:
    """The 2-process jobs, run once: FSDP and DDP, FSDP stopped at step 2 and resumed,
    FSDP with ``--train touched``, and the sharding probe."""
    root = tmp_path_factory.mktemp("fsdp")
    original = tiny.model("llama")
    merged, plan = _merged(original, root / "merged", [(1, 3)])
    models = Models(original, merged, plan, _write_text(root / "text.txt", 240))
    # FFs 2-3 tied: block 0 is not touched, so --train touched freezes its weights.
    merged23, plan23 = _merged(original, root / "m23", [(2, 3)])
    partial = replace(models, merged=merged23, plan=plan23)
    fsdp = {**OPTIONS, "parallel": "fsdp", "checkpoint_dir": root / "checkpoints"}
    resumed = {**fsdp, "checkpoint_dir": root / "resumed"}
    jobs = [
        (_run, models, root / "fsdp.onnx", fsdp),
        (_run, models, root / "ddp.onnx", {**OPTIONS, "parallel": "ddp"}),
        (_run, models, root / "resumed.onnx", {**resumed, "stop_after": 2}),
        (_run, models, root / "resumed.onnx", {**resumed, "resume": True}),
        (_run, partial, root / "touched.onnx", {**TOUCHED, "plan": plan23, "parallel": "fsdp"}),
        (_probe, models, root / "probe"),
    ]  # fmt: skip
    ports = [_free_port() for _ in jobs]
    mp.spawn(_worker, args=(jobs, ports), nprocs=2, join=True)
    return models, partial, root


def _close(got: dict, expected: dict, tolerance: float) -> float:
    worst = max(float(np.max(np.abs(got[n] - expected[n].astype(np.float64)))) for n in expected)
    assert worst <= tolerance, worst
    return worst


def test_fsdp_equals_one_process_and_ddp(runs, tmp_path):
    models, _, root = runs
    single = tmp_path / "single.onnx"
    one = _recover(models, single, **OPTIONS)
    sharded = json.loads((root / "fsdp.json").read_text())
    expected, start = _weights(single), _weights(models.merged)
    assert any(not np.array_equal(expected[n], start[n]) for n in expected)
    _close(_weights(root / "fsdp.onnx"), expected, ONE_PROCESS)
    _close(_weights(root / "fsdp.onnx"), _weights(root / "ddp.onnx"), DDP)
    # The same validation history, improving, so the last step is the best.
    assert sharded["best_step"] == one["best_step"] == 4 and len(sharded["history"]) == 3
    for got, want in zip(sharded["history"], one["history"], strict=True):
        assert got["valid"] == pytest.approx(want["valid"], rel=1e-5)
    assert sharded["trained_parameters"] == one["trained_parameters"]


def test_fsdp_resume_equals_an_uninterrupted_run_bit_for_bit(runs):
    _, _, root = runs
    expected, got = _weights(root / "fsdp.onnx"), _weights(root / "resumed.onnx")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_fsdp_trains_only_the_touched_weights(runs, tmp_path):
    _, partial, root = runs
    single = tmp_path / "touched.onnx"
    one = _recover(partial, single, **TOUCHED, plan=partial.plan)
    sharded = json.loads((root / "touched.json").read_text())
    assert (
        sharded["trained_parameters"]
        == one["trained_parameters"]
        < sum(array.size for array in _weights(partial.merged).values())
    )
    before, got, expected = (
        _weights(partial.merged),
        _weights(root / "touched.onnx"),
        _weights(single),
    )
    frozen = {name for name in before if np.array_equal(before[name], expected[name])}
    assert frozen and len(frozen) < len(before)
    assert all(np.array_equal(got[name], before[name]) for name in frozen)
    _close(got, expected, ONE_PROCESS)


def test_each_block_is_a_unit_and_each_process_holds_half(runs):
    _, _, root = runs
    records = [json.loads((root / f"probe.{rank}.json").read_text()) for rank in (0, 1)]
    # One unit per block, then the final norm and head: block 0 holds the embedding and its
    # 9 weights; blocks 1-3 their norms and attention; the FF tied over them (gate, up,
    # down) is read in 3 units, so it is shared (the root unit).
    assert records[0]["unit_weights"] == [10, 6, 6, 6, 2] and len(records[0]["shared"]) == 3
    assert all(record["difference"] == 0 for record in records)
    for key in ("units", "shared"):
        for (whole, first), (_, second) in zip(records[0][key], records[1][key], strict=True):
            assert first == second == whole // 2  # every dim 0 here is even: no padding


def test_fsdp_in_one_process_is_plain_training_and_says_so(runs, tmp_path, capsys):
    models, _, _ = runs
    capsys.readouterr()
    assert _cli(models, models.merged, tmp_path / "one.onnx", "--parallel", "fsdp") == 0
    assert "--parallel fsdp in one process: nothing to shard" in capsys.readouterr().err
    with pytest.raises(LayerfuseError, match="unknown --parallel 'zero' \\(choose ddp or fsdp\\)"):
        _recover(models, tmp_path / "never.onnx", parallel="zero")
    assert not (tmp_path / "never.onnx").exists()
