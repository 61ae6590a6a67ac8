"""Recovery training: the loss falls, write-back keeps the graph, resume and DDP reproduce a run.

Everything runs on the tiny Llama (4 blocks, width 32) with FFs 1-3 merged by permutation,
trained on a small seeded text file, so the whole file takes well under two minutes on 2 cores.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from layerfuse.cli import main
from layerfuse.data.batches import make_batches
from layerfuse.model.io import load_model, save_model, weight_bytes
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.stats import shared_matmul_weights
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.recover.checkpoint import load_state
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.mapping import map_blocks
from layerfuse.recover.objectives import Objective
from layerfuse.recover.run import RecoverRequest, recover
from layerfuse.recover.settings import TrainSettings
from layerfuse.recover.teacher import Teacher
from layerfuse.recover.writeback import graph_invariants
from layerfuse.runtime.session import create_session
from tests.tiny_models import WORDS

SETTINGS = TrainSettings(
    steps=4, batch_size=4, grad_accum=1, seq_len=32, lr=1e-3, warmup=1,
    eval_every=0, patience=0, valid_tokens=128, seed=0,
)  # fmt: skip


@dataclass
class Models:
    original: Path
    merged: Path
    plan: Path
    text: Path


def _write_text(path: Path, paragraphs: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(WORDS, size=int(rng.integers(20, 40)))) for _ in range(paragraphs)]
    path.write_text("\n\n".join(lines) + "\n")
    return path


def _merged(original: Path, folder: Path, ranges: list[tuple[int, int]]) -> tuple[Path, Path]:
    plan = plan_merge(original, MergeRequest(ranges=ranges, method="permute"))
    path = folder / "model.onnx"
    save_model(apply_plan(original, plan), path)
    carry_manifest(original, path)
    plan.save(folder / "plan.json")
    return path, folder / "plan.json"


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("recover")
    original = tiny.model("llama")
    merged, plan = _merged(original, root / "merged", [(1, 3)])
    return Models(original, merged, plan, _write_text(root / "text.txt", 240))


def _recover(models: Models, output: Path, **options) -> dict:
    settings = replace(SETTINGS, **options.pop("settings", {}))
    request = RecoverRequest(
        models.original, models.merged, output, data=str(models.text), settings=settings, **options
    )
    return recover(request)


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {
        name: np.array(value.const_value.numpy())
        for name, value in load_model(path).graph.initializers.items()
    }


def _teacher_batch(models: Models, tokens: int, batch_size: int):
    """(the student's feeds, the original's logits on them, the batch) of one train batch."""
    teacher = Teacher(models.original)
    batch = make_batches(
        models.original, str(models.text), "train", tokens=tokens, seq_len=32,
        batch_size=batch_size,
    )[0]  # fmt: skip
    feeds = teacher.feeds(batch.feeds)
    return feeds, torch.from_numpy(teacher.run(feeds)[0]), batch


def test_one_step_lowers_the_distillation_loss(models):
    student = GraphModule(load_model(models.merged))
    tied = shared_matmul_weights(load_model(models.merged))
    # A tied initializer is one parameter: its gradient sums over all its readers.
    assert tied and set(tied) <= set(student.named_weights())
    assert len(student.weights) == len(set(student.weight_names))
    feeds, target, batch = _teacher_batch(models, tokens=256, batch_size=8)
    inputs = {name: torch.from_numpy(feeds[name]) for name in student.input_names}
    mask = torch.from_numpy(batch.mask)
    objective = Objective("kd", "causal-lm")

    def loss() -> torch.Tensor:
        logits = student(inputs)[0][0]
        total = objective.loss_sum(logits, {}, target, {}, inputs["input_ids"], mask)
        return total / objective.term_count(batch.mask)

    optimizer = torch.optim.AdamW(student.weights, lr=2e-5)
    first = loss()
    first.backward()
    optimizer.step()
    before = float(first.detach())
    with torch.no_grad():
        after = float(loss())
    # Random tiny models predict nearly uniform tokens, so the KL is small, but not zero.
    assert before > 1e-6
    assert after < 0.95 * before
    # The interpreter runs the teacher's own graph exactly: its KD loss against itself is 0.
    itself = GraphModule(load_model(models.original))
    with torch.no_grad():
        logits = itself(inputs)[0][0].numpy()
    np.testing.assert_allclose(logits, target.numpy(), atol=1e-4)


def test_write_back_keeps_ties_and_bytes_and_matches_the_trained_module(models, tmp_path):
    out = tmp_path / "out" / "model.onnx"
    checkpoints = tmp_path / "checkpoints"
    summary = _recover(
        models,
        out,
        objective="lm",
        checkpoint_dir=checkpoints,
        settings={"eval_every": 4, "lr": 1e-2},
    )
    # lm on the text lowers the valid perplexity, so the last step is the best (and in state.pt)
    assert summary["finished"] and summary["best_step"] == 4
    assert summary["history"][-1]["valid"] < summary["history"][0]["valid"]
    before, after = load_model(models.merged), load_model(out)
    assert graph_invariants(after) == graph_invariants(before)
    assert weight_bytes(after) == weight_bytes(before)
    assert shared_matmul_weights(after) == shared_matmul_weights(before) != {}
    tied = next(iter(shared_matmul_weights(before)))
    assert not np.allclose(_weights(out)[tied], _weights(models.merged)[tied])

    trained = GraphModule(load_model(models.merged))
    params = load_state(checkpoints / "state.pt")["params"]
    with torch.no_grad():
        for name, parameter in trained.named_weights().items():
            parameter.copy_(params[name])
    batch = make_batches(
        models.original, str(models.text), "test", tokens=128, seq_len=32, batch_size=4
    )[0]
    session = create_session(out, provider="cpu", optimization="disable")
    reference = session.run(None, batch.feeds)[0]
    feeds = {name: torch.from_numpy(batch.feeds[name]) for name in trained.input_names}
    with torch.no_grad():
        np.testing.assert_allclose(trained(feeds)[0][0].numpy(), reference, atol=1e-4, rtol=0)


def test_resume_equals_an_uninterrupted_run(models, tmp_path):
    whole = tmp_path / "whole.onnx"
    _recover(models, whole)
    resumed, checkpoints = tmp_path / "resumed.onnx", tmp_path / "checkpoints"
    stopped = _recover(models, resumed, checkpoint_dir=checkpoints, stop_after=2)
    assert not stopped["finished"] and stopped["steps_done"] == 2 and not resumed.exists()
    _recover(models, resumed, checkpoint_dir=checkpoints, resume=True)
    expected, got, start = _weights(whole), _weights(resumed), _weights(models.merged)
    assert any(not np.array_equal(expected[n], start[n]) for n in expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-7, rtol=0, err_msg=name)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _ddp_worker(rank: int, world_size: int, port: int, models: Models, output: Path) -> None:
    os.environ.update(
        WORLD_SIZE=str(world_size), RANK=str(rank), LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )  # fmt: skip
    torch.set_num_threads(1)
    _recover(models, output)


def test_two_processes_with_ddp_equal_one_process(models, tmp_path):
    single = tmp_path / "single.onnx"
    _recover(models, single)
    parallel = tmp_path / "ddp.onnx"
    mp.spawn(_ddp_worker, args=(2, _free_port(), models, parallel), nprocs=2, join=True)
    expected, got, start = _weights(single), _weights(parallel), _weights(models.merged)
    assert any(not np.array_equal(expected[n], start[n]) for n in expected)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=2e-6, rtol=0, err_msg=name)


def _cli(models: Models, optimized: Path, output: Path, *extra: str) -> int:
    args = ["recover", str(models.original), str(optimized), "-o", str(output)]
    return main([*args, "--data", str(models.text), "--steps", "1", "--seq-len", "32", *extra])


def test_bad_input_is_one_error_line_and_writes_nothing(models, tiny, tmp_path, capsys):
    prune_plan = tmp_path / "prune.json"
    plan_prune(models.original, PruneRequest(target="block", blocks=[1])).save(prune_plan)
    gpt2 = tiny.model("gpt2")
    foreign, foreign_plan = _merged(gpt2, tmp_path / "foreign", [(0, 1)])
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    short = _write_text(tmp_path / "short.txt", 16, seed=1)
    out = tmp_path / "out" / "model.onnx"
    cases = [
        (models.merged, out, ["--plan", str(prune_plan)], "was not made by a layerfuse.prune"),
        (models.merged, out, ["--plan", str(foreign_plan)], "does not fit ORIGINAL"),
        (foreign, out, [], "OPTIMIZED was derived from a model with fingerprint"),
        (gpt2, out, [], "OPTIMIZED records no source model"),
        (models.merged, out, ["--data", str(short), "--batch-size", "8"], "fewer than one"),
        (models.merged, blocked / "model.onnx", [], "cannot write"),
    ]
    for optimized, output, extra, message in cases:
        capsys.readouterr()
        assert _cli(models, optimized, output, *extra) == 2
        # Progress lines ("· reading training text") may come first; one error line, no trace.
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert all(line.startswith("· ") for line in err[:-1]), err
        assert err[-1].startswith("layerfuse: error:") and message in err[-1], (extra, err)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert blocked.read_text() == "not a folder"


def test_truncated_backward_gives_the_trained_blocks_the_full_gradients(models, tmp_path):
    """``--train touched`` freezes the rest, so autograd keeps no graph through the frozen
    prefix: the trained weights get exactly the gradients full backward gives them, and the
    frozen ones (block 0, the embedding) get none."""
    merged, _ = _merged(models.original, tmp_path / "merged23", [(2, 3)])
    touched = map_blocks(load_model(models.original), load_model(merged)).touched_initializers
    feeds, target, batch = _teacher_batch(models, tokens=128, batch_size=4)
    objective = Objective("kd", "causal-lm")

    def gradients(trainable: set[str] | None) -> dict[str, torch.Tensor | None]:
        student = GraphModule(load_model(merged))
        weights = student.named_weights()
        for name, parameter in weights.items():
            parameter.requires_grad_(trainable is None or name in trainable)
        inputs = {name: torch.from_numpy(feeds[name]) for name in student.input_names}
        logits = student(inputs)[0][0]
        mask = torch.from_numpy(batch.mask)
        objective.loss_sum(logits, {}, target, {}, inputs["input_ids"], mask).backward()
        return {name: parameter.grad for name, parameter in weights.items()}

    full, truncated = gradients(None), gradients(touched)
    frozen = set(full) - touched
    assert touched and frozen
    for name in touched:
        torch.testing.assert_close(truncated[name], full[name], rtol=1e-5, atol=1e-7)
    assert all(truncated[name] is None for name in frozen)
    assert all(full[name] is not None for name in frozen)


def test_kd_hidden_trains_only_the_touched_blocks(models, tmp_path):
    # FFs 2-3 merged: blocks 1-3 are touched (modified and their neighbours), block 0 is not.
    merged, plan = _merged(models.original, tmp_path / "merged23", [(2, 3)])
    out = tmp_path / "out" / "model.onnx"
    partial = replace(models, merged=merged, plan=plan)
    summary = _recover(
        partial, out, objective="kd+hidden", train="touched", plan=plan, settings={"lr": 1e-2}
    )
    assert summary["finished"]
    structure = detect_structure(load_model(merged))
    before, after = _weights(merged), _weights(out)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    block_0 = {linear.weight.name for linear in structure.blocks[0].ff.linears.values()}
    block_3 = {linear.weight.name for linear in structure.blocks[3].ff.linears.values()}
    assert block_3 <= changed
    assert not block_0 & changed
    embedding = max(before, key=lambda name: before[name].size)
    assert embedding not in changed
