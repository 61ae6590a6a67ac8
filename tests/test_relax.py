"""Relaxed ties: zero deltas are the plain tie, SVD deltas restore the layers, counts are net,
recovery trains the deltas, quantization keeps the shared part one initializer, plans replay.

Tiny Llama (SwiGLU, MatMul weights, no biases: d 32, width 64) and tiny GPT-2 (GELU, Gemm
with biases: d 32, width 128), FFs 1-3 tied.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from layerfuse.cli import main
from layerfuse.data.batches import make_batches
from layerfuse.errors import PlanError
from layerfuse.model.io import load_model, parameter_count, save_model, weight_bytes
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.stats import shared_matmul_weights
from layerfuse.passes.detect import FeedForward, detect_structure
from layerfuse.passes.ff_weights import FFWeights, ff_forward, read_ff_weights
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.recover.checkpoint import load_state
from layerfuse.recover.graph_module import GraphModule
from layerfuse.recover.mapping import map_blocks
from layerfuse.runtime.session import create_session, session_for_ir
from layerfuse.toolchain import quantize_model
from tests.test_recover import Models, _recover, _weights, _write_text
from tests.test_toolchain import _weight_readers

RANDOM = DataSettings(data="random", calib_tokens=256)


def _plan(path: Path, rank: int = 0, init: str = "svd"):
    request = MergeRequest(
        ranges=[(1, 3)], method="permute", data=RANDOM, relax_rank=rank, relax_init=init
    )
    return plan_merge(path, request)


def _logits(model, path: Path) -> np.ndarray:
    batches = make_batches(path, "random", "test", tokens=128, seq_len=16, batch_size=4)
    session = session_for_ir(model, path.parent, provider="cpu")
    return np.concatenate([session.run(None, b.feeds)[0].reshape(-1) for b in batches])


def _effective(ff: FeedForward) -> FFWeights:
    """The weights a (maybe relaxed) FF computes with: shared matrix plus its own ``A @ B``."""
    weights = read_ff_weights(ff)
    for role, linear in ff.linears.items():
        if getattr(linear, "relax_rank", 0):
            delta = linear.delta_in.read_weight() @ linear.delta_out.read_weight()
            weights.matrices[role] = weights.matrices[role] + delta
    return weights


def _ff_error(original: FeedForward, candidate: FeedForward, x: np.ndarray) -> float:
    reference = ff_forward(read_ff_weights(original), x)
    got = ff_forward(_effective(candidate), x)
    return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))


# Llama: MatMul; GPT-2: Gemm with its bias inside; BERT: MatMul + bias Add (onnxruntime fuses
# it into BiasGelu / SkipLayerNormalization); Phi-3: one fused gate+up projection.
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "phi3"])
def test_zero_deltas_are_the_plain_tie_bit_for_bit(tiny, family):
    path = tiny.model(family)
    plain = apply_plan(path, _plan(path))
    relaxed = apply_plan(path, _plan(path, rank=4, init="zero"))
    assert np.array_equal(_logits(relaxed, path), _logits(plain, path))
    structure = detect_structure(relaxed)
    for index in (1, 2, 3):
        linears = structure.blocks[index].ff.linears
        assert {role: lin.relax_rank for role, lin in linears.items()} == dict.fromkeys(linears, 4)
        assert not np.any(linears["down"].delta_out.read_weight())
        assert linears["down"].bias is not None or family in ("llama", "phi3")
    assert "relax_rank" not in structure.to_json()["blocks"][0]["ff"]
    assert structure.to_json()["blocks"][2]["ff"]["relax_rank"]["up"] == 4
    # Still one shared weight per projection node (Phi-3's gate+up is one) across the window.
    assert sorted(shared_matmul_weights(relaxed).values()) == [3] * len(
        {lin.node for lin in linears.values()}
    )


def _projection_errors(path: Path, rank: int, x: np.ndarray) -> list[float]:
    """Per tied layer and projection: ``|x W_eff - x W_i| / |x W_i|``, ``W_i`` the layer's own
    matrix in the shared neuron order."""
    original = detect_structure(load_model(path)).blocks
    plan = _plan(path, rank=rank)
    blocks = detect_structure(apply_plan(path, plan)).blocks
    errors = []
    for i in (1, 2, 3):
        own = read_ff_weights(original[i].ff)
        permutation = plan.windows[0].permutations.get(i)
        if permutation is not None:
            own = own.permuted(np.asarray(permutation))
        got = _effective(blocks[i].ff)
        for role, matrix in own.matrices.items():
            want = x[:, : matrix.shape[0]] @ matrix
            error = x[:, : matrix.shape[0]] @ got.matrices[role] - want
            errors.append(float(np.linalg.norm(error) / np.linalg.norm(want)))
    return errors


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_svd_deltas_move_each_projection_toward_the_layers_own(tiny, family):
    path = tiny.model(family)
    x = np.random.default_rng(0).standard_normal((64, 128))
    plain, low, higher = (_projection_errors(path, rank, x) for rank in (0, 2, 8))
    assert all(h < lo < p for p, lo, h in zip(plain, low, higher, strict=True))


def test_svd_deltas_move_each_ff_toward_its_own(tiny):
    # The tiny Llama has no biases (GPT-2's stay averaged, which a delta on x cannot undo).
    path = tiny.model("llama")
    original = detect_structure(load_model(path)).blocks
    x = np.random.default_rng(0).standard_normal((64, 32))
    errors = {}
    for rank in (0, 2, 8):
        blocks = detect_structure(apply_plan(path, _plan(path, rank=rank))).blocks
        errors[rank] = [_ff_error(original[i].ff, blocks[i].ff, x) for i in (1, 2, 3)]
    for block in range(3):
        assert errors[8][block] < errors[2][block] < errors[0][block]


def test_full_rank_svd_deltas_reproduce_the_original(tiny):
    # The tiny Llama has no biases, so W_shared + A B = W_i restores every FF exactly.
    path = tiny.model("llama")
    relaxed = apply_plan(path, _plan(path, rank=32))
    original = detect_structure(load_model(path)).blocks
    blocks = detect_structure(relaxed).blocks
    x = np.random.default_rng(1).standard_normal((64, 32))
    for i in (1, 2, 3):
        want = ff_forward(read_ff_weights(original[i].ff), x)
        np.testing.assert_allclose(ff_forward(_effective(blocks[i].ff), x), want, atol=1e-4)
    reference = _logits(load_model(path), path)
    np.testing.assert_allclose(_logits(relaxed, path), reference, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("family", "per_layer"), [("llama", 3 * (32 + 64)), ("gpt2", 2 * 160)])
def test_parameters_removed_are_net_of_the_deltas(tiny, tmp_path, family, per_layer):
    path = tiny.model(family)
    plain, relaxed = _plan(path), _plan(path, rank=2)
    deltas = 3 * 2 * per_layer  # 3 layers, rank 2, R * (in + out) per projection
    assert relaxed.parameters_removed == plain.parameters_removed - deltas
    assert relaxed.bytes_removed == plain.bytes_removed - 4 * deltas
    written = save_model(apply_plan(path, relaxed), tmp_path / "model.onnx")
    before, after = load_model(path), load_model(written)
    assert parameter_count(before) - parameter_count(after) == relaxed.parameters_removed
    assert weight_bytes(before) - weight_bytes(after) == relaxed.bytes_removed
    tied = detect_structure(apply_plan(path, plain)).blocks[2].ff.parameter_count
    assert detect_structure(after).blocks[2].ff.parameter_count == tied + 2 * per_layer


def test_bad_relax_options_are_one_line(tiny, tmp_path, capsys):
    path = tiny.model("llama")
    with pytest.raises(PlanError, match="relax rank 33 is larger than the gate projection"):
        _plan(path, rank=33)
    out = tmp_path / "out" / "model.onnx"
    cases = [
        (["--relax-rank", "33"], "min of 32 inputs and 64 outputs: 32"),
        (["--relax-rank", "2", "--refit"], "cannot be combined"),
        (["--relax-rank", "-1"], "--relax-rank must be a finite number >= 0"),
    ]
    for extra, message in cases:
        capsys.readouterr()
        args = ["merge", str(path), "-o", str(out), "--blocks", "1-3", "--method", "vanilla"]
        assert main([*args, "--data", "random", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not out.parent.exists()
    # A rank whose deltas outweigh the tie is allowed (full rank restores the FFs) but said.
    # 3 layers x 20 x 288 = 17280 delta parameters against 2 FFs x 6144 = 12288 removed.
    capsys.readouterr()
    assert main([*args, "--data", "random", "--relax-rank", "20"]) == 0
    printed = capsys.readouterr()
    assert "the deltas add 4992 parameters more than the tie removes" in printed.out + printed.err


@pytest.fixture(scope="module")
def relaxed(tiny, tmp_path_factory) -> Models:
    root = tmp_path_factory.mktemp("relaxed")
    original = tiny.model("llama")
    plan = _plan(original, rank=2)
    path = save_model(apply_plan(original, plan), root / "merged" / "model.onnx")
    carry_manifest(original, path)
    plan.save(root / "merged" / "plan.json")
    return Models(original, path, root / "merged" / "plan.json", _write_text(root / "t.txt", 120))


def test_recover_trains_the_deltas_and_writes_back_what_the_module_computes(relaxed, tmp_path):
    deltas = {n for n in _weights(relaxed.merged) if n.startswith("layerfuse.relax.")}
    assert len(deltas) == 3 * 3 * 2  # 3 layers x gate/up/down x A/B
    assert (
        deltas
        <= map_blocks(load_model(relaxed.original), load_model(relaxed.merged)).touched_initializers
    )
    out, checkpoints = tmp_path / "out" / "model.onnx", tmp_path / "checkpoints"
    settings = {"steps": 2, "eval_every": 2, "lr": 1e-2}
    summary = _recover(
        relaxed, out, train="touched", plan=relaxed.plan, checkpoint_dir=checkpoints,
        objective="lm", settings=settings,
    )  # fmt: skip
    assert summary["finished"]
    before, after = _weights(relaxed.merged), _weights(out)
    assert all(not np.array_equal(before[name], after[name]) for name in deltas)
    assert shared_matmul_weights(load_model(out)) == shared_matmul_weights(
        load_model(relaxed.merged)
    )
    trained = GraphModule(load_model(relaxed.merged))
    params = load_state(checkpoints / "state.pt")["params"]
    with torch.no_grad():
        for name, parameter in trained.named_weights().items():
            parameter.copy_(params[name])
    batch = make_batches(
        relaxed.original, str(relaxed.text), "test", tokens=64, seq_len=32, batch_size=2
    )[0]
    reference = create_session(out, provider="cpu", optimization="disable").run(None, batch.feeds)
    feeds = {name: torch.from_numpy(batch.feeds[name]) for name in trained.input_names}
    with torch.no_grad():
        np.testing.assert_allclose(trained(feeds)[0][0].numpy(), reference[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_relaxed_tie_keeps_one_shared_initializer(relaxed, tmp_path, scheme):
    out = tmp_path / scheme / "model.onnx"
    result = quantize_model(relaxed.merged, out, scheme)
    assert [check.readers for check in result.ties] == [3, 3, 3]
    assert all(check.kept for check in result.ties)
    # The quantized shared weights: 3 initializers (gate, up, down), each read by all 3 layers.
    shared = {name: count for name, count in _weight_readers(out).items() if count > 1}
    assert sorted(shared.values()) == [3, 3, 3]


def test_a_saved_relaxed_plan_reproduces_the_same_graph_bytes(tiny, tmp_path):
    path = tiny.model("llama")
    first = tmp_path / "first" / "model.onnx"
    args = ["--blocks", "1-3", "--data", "random", "--calib-tokens", "256", "--relax-rank", "3"]
    assert main(["merge", str(path), "-o", str(first), *args]) == 0
    plan_file = first.with_suffix(".plan.json")
    again = tmp_path / "again" / "model.onnx"
    assert main(["merge", str(path), "-o", str(again), "--plan", str(plan_file)]) == 0
    assert again.read_bytes() == first.read_bytes()
    assert '"relax": {' in plan_file.read_text()
    assert detect_structure(load_model(again)).blocks[1].ff.down.relax_rank == 3


def test_a_relaxed_tie_is_not_merged_again(relaxed):
    with pytest.raises(PlanError, match="FFs of blocks 1-2 are already relaxed"):
        plan_merge(relaxed.merged, MergeRequest(ranges=[(1, 2)], method="vanilla"))


def test_fusing_a_relaxed_tie_is_refused_instead_of_dropping_its_deltas(tiny, tmp_path):
    from layerfuse.passes.fuse import FusePlan

    path = tiny.model("llama")
    relaxed = tmp_path / "relaxed.onnx"
    plan = plan_merge(path, MergeRequest(ranges=[(1, 2)], method="vanilla", relax_rank=2))
    save_model(apply_plan(path, plan), relaxed)
    structure = detect_structure(load_model(relaxed))
    fuse = FusePlan(structure.fingerprint, len(structure.blocks), [2], [(1, 2)])
    with pytest.raises(PlanError, match="relaxed tie"):
        apply_plan(relaxed, fuse)
