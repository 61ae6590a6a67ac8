"""Aligned FF merging: exactness, byte accounting, alignment and refit (plans and bad input:
``test_merge_plans.py``)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from layerfuse.data.batches import make_batches
from layerfuse.model.io import load_model, save_model, weight_bytes
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.ff_weights import ff_forward, read_ff_weights
from layerfuse.passes.merge import MergePlan, MergeRequest, plan_merge
from layerfuse.passes.merge.correlation import PairStatistics, align
from layerfuse.passes.merge.refit import refit_down_projections, refit_systems
from layerfuse.passes.merge.tie import tie_weights
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.runtime.calibration import ActivationTap
from layerfuse.runtime.quality import output_fidelity
from layerfuse.runtime.session import create_session, session_for_ir


def _outputs(session, batches) -> np.ndarray:
    return np.concatenate([session.run(None, b.feeds)[0].reshape(-1) for b in batches])


def _random_batches(path, tokens=256):
    return make_batches(path, "random", "calib", tokens=tokens, seq_len=16, batch_size=4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_permuting_one_ff_leaves_the_output_unchanged(tiny, family):
    path = tiny.model(family)
    batches = _random_batches(path)
    reference = _outputs(create_session(path, provider="cpu"), batches)
    model = load_model(path)
    ff = detect_structure(model).blocks[1].ff
    permutation = np.random.default_rng(0).permutation(ff.width)
    tie_weights(model.graph, [ff], read_ff_weights(ff).permuted(permutation), "test.permuted")
    permuted = _outputs(session_for_ir(model, path.parent, provider="cpu"), batches)
    assert np.max(np.abs(permuted - reference)) <= 1e-5
    assert not np.array_equal(
        read_ff_weights(detect_structure(model).blocks[1].ff).matrices["down"],
        read_ff_weights(ff).matrices["down"],
    )


def _copy_ff(model: ir.Model, source: int, targets: list[int], permutations=None) -> None:
    """Give the FFs of ``targets`` private copies of FF ``source``'s weights (maybe permuted)."""
    blocks = detect_structure(model).blocks
    weights = read_ff_weights(blocks[source].ff)
    for i, target in enumerate(targets):
        own = weights if permutations is None else weights.permuted(permutations[i])
        tie_weights(model.graph, [blocks[target].ff], own, f"copy.{target}")


def _model_with_copies(tiny, tmp_path, permute: bool):
    path = tiny.model("llama")
    model = load_model(path)
    rng = np.random.default_rng(1)
    width = detect_structure(model).blocks[0].ff.width
    permutations = [rng.permutation(width) for _ in range(2)] if permute else None
    _copy_ff(model, 1, [2, 3], permutations)
    copied = tmp_path / "copies" / "model.onnx"
    save_model(model, copied)
    carry_manifest(path, copied)
    return copied, permutations


@pytest.mark.parametrize("method", ["vanilla", "permute"])
def test_merging_identical_ffs_is_a_no_op(tiny, tmp_path, method):
    # Blocks 1-3 compute the same function; for "permute" blocks 2 and 3 hold it with their
    # neurons shuffled, so only an exact alignment makes the average a no-op.
    path, shuffles = _model_with_copies(tiny, tmp_path, permute=method == "permute")
    batches = _random_batches(path)
    reference = _outputs(create_session(path, provider="cpu"), batches)
    request = MergeRequest(
        ranges=[(1, 3)],
        method=method,
        data=DataSettings(data="random", calib_tokens=512, seq_len=16),
    )
    plan = plan_merge(path, request)
    merged = apply_plan(path, plan)
    outputs = _outputs(session_for_ir(merged, path.parent, provider="cpu"), batches)
    assert np.max(np.abs(outputs - reference)) <= 1e-5
    if method == "permute":
        found = plan.windows[0].permutations
        for block, shuffle in zip((2, 3), shuffles, strict=True):
            assert found[block] == np.argsort(shuffle).tolist()


def test_vanilla_merge_of_shuffled_copies_is_not_a_no_op(tiny, tmp_path):
    path, _ = _model_with_copies(tiny, tmp_path, permute=True)
    batches = _random_batches(path)
    reference = _outputs(create_session(path, provider="cpu"), batches)
    plan = plan_merge(path, MergeRequest(ranges=[(1, 3)], method="vanilla"))
    outputs = _outputs(session_for_ir(apply_plan(path, plan), path.parent), batches)
    assert np.max(np.abs(outputs - reference)) > 1e-2


def test_tied_file_holds_exactly_the_expected_bytes(tiny, tmp_path):
    path = tiny.model("llama")
    original = load_model(path)
    structure = detect_structure(original)
    ff_bytes = sum(lin.weight.const_value.nbytes for lin in structure.blocks[0].ff.linears.values())
    plan = plan_merge(path, MergeRequest(ranges=[(0, 2)], method="vanilla"))
    assert plan.bytes_removed == 2 * ff_bytes
    assert plan.parameters_removed == 2 * structure.blocks[0].ff.parameter_count
    tied = apply_plan(path, plan)
    assert weight_bytes(original) - weight_bytes(tied) == 2 * ff_bytes
    save_model(load_model(path), tmp_path / "a" / "model.onnx", external_data=True)
    save_model(tied, tmp_path / "b" / "model.onnx", external_data=True)
    a = (tmp_path / "a" / "model.onnx.data").stat().st_size
    b = (tmp_path / "b" / "model.onnx.data").stat().st_size
    assert a - b == 2 * ff_bytes
    # Every FF of the window reads the same initializer objects, directly.
    blocks = detect_structure(load_model(tmp_path / "b" / "model.onnx")).blocks
    for role in ("gate", "up", "down"):
        weights = {blocks[i].ff.linears[role].consumed_weight.name for i in range(3)}
        assert len(weights) == 1 and next(iter(weights)).startswith("layerfuse.tied.0-2")
        assert blocks[0].ff.linears[role].weight_path == ()


def test_alignment_recovers_a_known_permutation():
    rng = np.random.default_rng(0)
    anchor = rng.standard_normal((2000, 32)).astype(np.float32)
    shuffle = rng.permutation(32)
    other = (anchor[:, shuffle] + 0.01 * rng.standard_normal((2000, 32))).astype(np.float32)
    stats = PairStatistics({0: 32, 1: 32}, [(0, 1)])
    for chunk in range(4):
        rows = slice(chunk * 500, (chunk + 1) * 500)
        stats.update({0: anchor[rows], 1: other[rows]})
    alignment = align(stats.correlation(0, 1))
    np.testing.assert_array_equal(alignment.permutation, np.argsort(shuffle))
    np.testing.assert_allclose(other[:, alignment.permutation], anchor, atol=0.05)
    assert alignment.matched_correlation > 0.99
    assert abs(alignment.identity_correlation) < 0.2


def _reconstruction_error(path, plan: MergePlan, batches) -> float:
    """Squared error between tied FFs and the original FFs on the tied model's FF inputs."""
    tied = apply_plan(path, plan)
    tied_blocks = detect_structure(tied).blocks
    original_blocks = detect_structure(load_model(path)).blocks
    members = plan.windows[0].blocks
    names = [tied_blocks[b].ff.input.name for b in members]
    tap = ActivationTap(tied, names, external_data_dir=path.parent, provider="cpu")
    error = 0.0
    for batch in batches:
        _, tapped = tap.run(batch.feeds)
        for block, name in zip(members, names, strict=True):
            x = tapped[name].reshape(-1, tapped[name].shape[-1])
            target = ff_forward(read_ff_weights(original_blocks[block].ff), x)
            got = ff_forward(read_ff_weights(tied_blocks[block].ff), x)
            error += float(np.square(got - target).sum())
    return error


def test_refit_solution_beats_averaging_on_its_least_squares_problem(tiny):
    path = tiny.model("llama")
    plan = plan_merge(path, MergeRequest(ranges=[(1, 3)], method="vanilla"))
    (system,) = refit_systems(path, plan, _random_batches(path, 512), provider="cpu")

    def objective(weights: np.ndarray) -> float:
        return float(
            np.trace(weights.T @ system.gram @ weights) - 2 * np.trace(weights.T @ system.cross)
        )

    averaged = objective(system.prior)
    for shrinkage in (0.01, 0.3, 3.0):
        solved = system.solve(shrinkage)["down"].astype(np.float64)
        assert solved.shape == (64, 32)
        assert objective(solved) < averaged
    # Strong shrinkage returns (almost) the averaged weights.
    np.testing.assert_allclose(system.solve(1e6)["down"], system.prior, atol=1e-4)


def test_refit_reconstructs_the_original_ffs_better_than_averaging(tiny, tmp_path):
    path = tiny.model("llama")
    plan = plan_merge(path, MergeRequest(ranges=[(1, 3)], method="vanilla"))
    batches = _random_batches(path, 512)
    averaged = _reconstruction_error(path, plan, batches)
    plan.refit_weights = refit_down_projections(path, plan, batches, shrinkage=1.0)
    refitted = _reconstruction_error(path, plan, batches)
    assert refitted < averaged
    # The refit weights travel in a sidecar, also into a folder that does not exist yet.
    saved = MergePlan.load(plan.save(tmp_path / "new" / "plan.json"))
    assert _reconstruction_error(path, saved, batches) == pytest.approx(refitted, rel=1e-6)


def _cosine_distance(path, model) -> float:
    """1 - mean cosine of the model's outputs to the original's: the planner's metric on
    random data, measured here with sessions of our own."""
    batches = make_batches(path, "random", "valid", tokens=256, seq_len=16)
    candidate = session_for_ir(model, path.parent, provider="cpu")
    reference = create_session(path, provider="cpu")
    return 1.0 - output_fidelity(reference, candidate, batches).mean_cosine


def test_refit_is_kept_when_it_brings_outputs_closer_to_the_original(tiny):
    path = tiny.model("llama")
    data = DataSettings(data="random", calib_tokens=512, valid_tokens=256, seq_len=16)
    plan = plan_merge(path, MergeRequest(ranges=[(1, 3)], method="vanilla", refit=True, data=data))
    refitted = _cosine_distance(path, apply_plan(path, plan))
    plan.refit_weights = {}
    averaged = _cosine_distance(path, apply_plan(path, plan))
    assert refitted < 0.9 * averaged
    assert plan.refit["kept"] and plan.refit["after"] == pytest.approx(refitted, rel=1e-4)


def test_refit_is_dropped_when_averaging_is_already_exact(tiny, tmp_path):
    # Blocks 1-3 hold the same FF: the average is the original, no refit can beat it.
    path, _ = _model_with_copies(tiny, tmp_path, permute=False)
    data = DataSettings(data="random", calib_tokens=512, valid_tokens=256, seq_len=16)
    plan = plan_merge(path, MergeRequest(ranges=[(1, 3)], method="vanilla", refit=True, data=data))
    assert not plan.refit["kept"] and plan.refit_weights == {}
    assert plan.refit["before"] == pytest.approx(0.0, abs=1e-6)
    assert all(trial["score"] >= plan.refit["before"] for trial in plan.refit["trials"])
