"""Local reconstruction, recovery's first stage: tied FFs fitted to the original FF outputs.

Tiny models (4 blocks, width 32) with FFs 1-3 merged (vanilla): the fit lowers every tied
block's held-out relative error and moves only the shared weights, ties stay one initializer
each, the written model carries the fit into onnxruntime, ``--local-steps 0`` is the plain
distillation run bit for bit, and a resume neither redoes the stage nor accepts other settings.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from layerfuse.cli import main
from layerfuse.data.batches import make_batches
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.stats import shared_matmul_weights
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.recover.data import load_training_data
from layerfuse.recover.distributed import from_environment
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.local import NOTHING, LocalSettings, reconstruct
from layerfuse.recover.objectives import Objective
from layerfuse.recover.run import RecoverRequest, recover
from layerfuse.recover.settings import TrainSettings
from layerfuse.recover.teacher import Teacher
from layerfuse.recover.tied_sets import find_tied_sets
from layerfuse.recover.trainer import Trainer
from layerfuse.recover.validation import Validator
from layerfuse.runtime.calibration import ActivationTap, token_rows
from tests.test_recover import _write_text

SETTINGS = TrainSettings(
    steps=2, batch_size=4, grad_accum=1, seq_len=32, lr=1e-3, warmup=1,
    eval_every=0, patience=0, valid_tokens=128, seed=0,
)  # fmt: skip
LOCAL = LocalSettings(steps=60, tokens=128, cache_tokens=1024, eval_tokens=256, lr=1e-3)


def _merged(original: Path, folder: Path) -> Path:
    plan = plan_merge(original, MergeRequest(ranges=[(1, 3)], method="vanilla"))
    path = folder / "model.onnx"
    save_model(apply_plan(original, plan), path)
    carry_manifest(original, path)
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    return _write_text(tmp_path_factory.mktemp("local") / "text.txt", 240)


@pytest.fixture(scope="module")
def llama(tiny, tmp_path_factory) -> tuple[Path, Path]:
    original = tiny.model("llama")
    return original, _merged(original, tmp_path_factory.mktemp("llama-merged"))


def _weights(path: Path) -> dict[str, np.ndarray]:
    return {
        name: np.array(value.const_value.numpy())
        for name, value in load_model(path).graph.initializers.items()
    }


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_fit_lowers_each_tied_blocks_error_and_moves_only_shared_weights(
    family, tiny, text, tmp_path
):
    original = tiny.model(family)
    merged = _merged(original, tmp_path)
    student = GraphModule(load_model(merged))
    start = {n: p.detach().clone() for n, p in student.named_weights().items()}
    data = load_training_data(original, str(text), "train", seq_len=32)
    summary = reconstruct(original, load_model(original), load_model(merged), student, data, LOCAL)
    (tied,) = summary["sets"]
    assert tied["blocks"] == [1, 2, 3]
    # SwiGLU (llama: gate, up, down) and GELU with biases (gpt2: up, down and their biases).
    assert len(tied["weights"]) == (3 if family == "llama" else 4)
    for before, after in zip(tied["per_block_before"], tied["per_block_after"], strict=True):
        assert after < 0.9 * before, (before, after)
    assert tied["relative_error_after"] < 0.85 * tied["relative_error_before"]
    changed = {n for n, p in student.named_weights().items() if not torch.equal(p, start[n])}
    assert changed == set(tied["weights"])
    assert not any(p.grad is not None for p in student.weights)


def test_sequential_inputs_lower_the_error_too(llama, text):
    original, merged = llama
    student = GraphModule(load_model(merged))
    data = load_training_data(original, str(text), "train", seq_len=32)
    sequential = replace(LOCAL, inputs="sequential")
    summary = reconstruct(
        original, load_model(original), load_model(merged), student, data, sequential
    )
    (tied,) = summary["sets"]
    assert tied["relative_error_after"] < 0.85 * tied["relative_error_before"]


def _ff_error(model: Path, original: Path, text: Path) -> float:
    """Mean relative error of blocks 1-3's FF in ``model`` against the original's FF outputs,
    on the test split, on the original's FF inputs: onnxruntime taps, torch FF regions."""
    (tied,) = find_tied_sets(load_model(original), load_model(model))
    names = [name for pair in tied.targets for name in pair]
    batch = make_batches(original, str(text), "test", tokens=256, seq_len=32, batch_size=8)[0]
    _, tapped = ActivationTap(original, names, provider="cpu").run(batch.feeds)
    student = GraphModule(load_model(model))
    errors = []
    with torch.no_grad():
        for (x, y), (x_in, y_out) in zip(tied.targets, tied.regions, strict=True):
            (out,) = student.run_region({x_in: torch.from_numpy(tapped[x])}, [y_out])
            got, want = token_rows(out.numpy(), batch.mask), token_rows(tapped[y], batch.mask)
            errors.append(np.mean((got - want) ** 2) / np.mean(want**2))
    return float(np.mean(errors))


def test_recover_writes_the_fit_with_ties_kept(llama, text, tmp_path):
    original, merged = llama
    out = tmp_path / "out" / "model.onnx"
    settings = replace(SETTINGS, lr=1e-7)  # distillation barely moves: the fit is what shows
    summary = recover(
        RecoverRequest(original, merged, out, data=str(text), settings=settings, local=LOCAL)
    )
    (tied,) = summary["local"]["sets"]
    assert tied["relative_error_after"] < 0.85 * tied["relative_error_before"]
    assert summary["verified_max_abs_diff"] < 1e-4
    before, after = load_model(merged), load_model(out)
    assert list(after.graph.initializers) == list(before.graph.initializers)
    assert shared_matmul_weights(after) == shared_matmul_weights(before) != {}
    assert all(shared_matmul_weights(after)[name] == 3 for name in tied["weights"])
    # The written model, run on held-out text, reproduces the original FFs better.
    assert _ff_error(out, original, text) < 0.9 * _ff_error(merged, original, text)


def _plain_distillation(original: Path, merged: Path, text: Path) -> dict[str, np.ndarray]:
    """The pipeline recover ran before local reconstruction existed, assembled by hand."""
    torch.manual_seed(SETTINGS.seed)
    student = GraphModule(load_model(merged))
    data = load_training_data(original, str(text), "train", seq_len=SETTINGS.seq_len)
    valid = make_batches(original, str(text), "valid", tokens=128, seq_len=32, batch_size=4)
    teacher = Teacher(original)
    validator = Validator(valid, teacher, "causal-lm")
    trainer = Trainer(
        student, teacher, Objective("kd", "causal-lm"), data, validator, SETTINGS,
        checkpoint_dir=None, run_key={}, dist=from_environment("cpu"),
    )  # fmt: skip
    trainer.run()
    return {n: p.detach().numpy() for n, p in student.named_weights().items()}


def test_local_steps_0_is_plain_distillation_bit_for_bit(llama, text, tmp_path):
    original, merged = llama
    out = tmp_path / "off.onnx"
    off = replace(LOCAL, steps=0)
    summary = recover(
        RecoverRequest(original, merged, out, data=str(text), settings=SETTINGS, local=off)
    )
    assert summary["local"]["sets"] == [] and summary["local"]["notes"] == ["off (--local-steps 0)"]
    expected, got = _plain_distillation(original, merged, text), _weights(out)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_resume_keeps_the_fit_and_refuses_other_local_settings(llama, text, tmp_path):
    original, merged = llama
    whole = tmp_path / "whole.onnx"
    request = RecoverRequest(
        original, merged, whole, data=str(text), settings=SETTINGS, local=LOCAL
    )
    first = recover(request)
    resumed, checkpoints = tmp_path / "resumed.onnx", tmp_path / "checkpoints"
    stop = replace(request, output=resumed, checkpoint_dir=checkpoints, stop_after=1)
    assert not recover(stop)["finished"]
    other = replace(stop, stop_after=None, resume=True, local=replace(LOCAL, steps=59))
    with pytest.raises(Exception, match="local"):
        recover(other)
    summary = recover(replace(other, local=LOCAL))
    assert summary["local"]["sets"] == first["local"]["sets"]
    expected, got = _weights(whole), _weights(resumed)
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-7, rtol=0, err_msg=name)


def test_cli_reports_the_stage_and_a_pruned_model_has_nothing_to_reconstruct(
    llama, text, tmp_path, capsys
):
    original, merged = llama
    pruned = tmp_path / "pruned" / "model.onnx"
    plan = plan_prune(original, PruneRequest(target="block", blocks=[2]))
    save_model(apply_plan(original, plan), pruned)
    carry_manifest(original, pruned)
    common = ["--data", str(text), "--steps", "1", "--seq-len", "32", "--local-tokens", "512"]
    assert main(["recover", str(original), str(merged), "-o", str(tmp_path / "a.onnx"), *common,
                 "--local-steps", "20"]) == 0  # fmt: skip
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("local reconstruction (20 steps") and "blocks 1-3" in line, line
    pruned_args = ["recover", str(original), str(pruned), "-o", str(tmp_path / "b.onnx")]
    assert main([*pruned_args, *common]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "local: " + NOTHING
    bad = ["recover", str(original), str(merged), "-o", str(tmp_path / "c.onnx"), *common]
    assert main([*bad, "--local-steps", "-1"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("layerfuse: error: --local-steps must be"), err


def test_an_encoder_skips_the_local_stage_unless_asked(tiny, text, tmp_path):
    original = tiny.model("bert")
    merged = _merged(original, tmp_path / "merged")
    runs = {}
    for encoders in ("skip", "run"):
        local = replace(LOCAL, encoders=encoders)
        out = tmp_path / encoders / "model.onnx"
        runs[encoders] = recover(
            RecoverRequest(original, merged, out, data=str(text), settings=SETTINGS, local=local)
        )["local"]
    assert runs["skip"]["sets"] == [] and runs["skip"]["steps"] == 0
    assert runs["skip"]["notes"] == ["skipped on an encoder (--local-encoders run to run it)"]
    (fitted,) = runs["run"]["sets"]
    assert fitted["relative_error_after"] < fitted["relative_error_before"]
    assert LOCAL.for_task("causal-lm") is LOCAL and LOCAL.for_task("encoder").steps == 0
