"""Aligned KV sharing: the fitted maps are right, fold in exactly, and bring the sharing
graph closer to the original than sharing the keys and values as they are.

The math is checked on arrays with a known answer (keys that are a per-pair complex scale of
others, turned by rotary angles per token); the pass on the tiny Llama.
"""

from __future__ import annotations

import numpy as np
import pytest

from layerfuse.errors import PlanError
from layerfuse.model.io import save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.share_kv import ShareKVPlan, ShareKVRequest, plan_share_kv
from layerfuse.passes.share_kv.align import Alignment, AlignmentSums, rotary_pairs
from layerfuse.passes.share_kv.fold import mapped_outputs, turned_queries
from layerfuse.runtime.evaluate import evaluate_model
from tests import kv_models

HEADS, KV_HEADS, DIM, TOKENS = 4, 2, 8, 64
SMALL_DATA = DataSettings(calib_tokens=512, valid_tokens=256, seq_len=32, batch_size=4)


def _complex(rows: np.ndarray, convention: str) -> np.ndarray:
    real, imaginary = rotary_pairs(rows.shape[-1], convention)
    return rows[..., real] + 1j * rows[..., imaginary]


def _real(values: np.ndarray, convention: str) -> np.ndarray:
    real, imaginary = rotary_pairs(2 * values.shape[-1], convention)
    rows = np.zeros((*values.shape[:-1], 2 * values.shape[-1]))
    rows[..., real], rows[..., imaginary] = values.real, values.imag
    return rows


@pytest.mark.parametrize("convention", ["half", "interleaved"])
def test_a_scaled_and_turned_copy_is_fitted_exactly_in_its_convention(convention):
    rng = np.random.default_rng(0)
    scale = rng.normal(size=(KV_HEADS, DIM // 2)) + 1j * rng.normal(size=(KV_HEADS, DIM // 2))
    mixing = rng.normal(size=(KV_HEADS, DIM, DIM))
    source = _complex(rng.normal(size=(TOKENS, KV_HEADS, DIM)), convention)
    turns = np.exp(1j * rng.uniform(0, 6.3, size=(TOKENS, 1, DIM // 2)))
    keys = (_real(source * turns, convention), _real(scale * source * turns, convention))
    values_source = rng.normal(size=(TOKENS, KV_HEADS, DIM))
    values = (values_source, np.einsum("hij,thj->thi", mixing, values_source))
    sums = AlignmentSums(KV_HEADS, DIM)
    sums.add(keys, values)
    other = "interleaved" if convention == "half" else "half"
    assert sums.key_fit(convention)[0] < 1e-10 < sums.key_fit(other)[0]
    fitted = sums.solve(convention)
    np.testing.assert_allclose(fitted.key_scale, scale, rtol=1e-8)
    np.testing.assert_allclose(fitted.value_map, mixing, rtol=1e-2, atol=1e-2)
    assert fitted.value_residual < 5e-3  # the ridge (VALUE_RIDGE) leaves a little


@pytest.mark.parametrize("convention", ["half", "interleaved"])
def test_folded_queries_and_outputs_equal_attention_over_mapped_keys_and_values(convention):
    """Scores of turned queries against the source keys equal the original queries' scores
    against the mapped keys, at every rotary angle; outputs likewise for values."""
    rng = np.random.default_rng(1)
    alignment = Alignment(
        convention,
        rng.normal(size=(KV_HEADS, DIM // 2)) + 1j * rng.normal(size=(KV_HEADS, DIM // 2)),
        rng.normal(size=(KV_HEADS, DIM, DIM)),
        0.0,
        0.0,
    )
    weight = rng.normal(size=(16, HEADS * DIM))
    x = rng.normal(size=(TOKENS, 16))
    turns = np.exp(1j * rng.uniform(0, 6.3, size=(TOKENS, 1, DIM // 2)))
    rotate = lambda rows: _complex(rows.reshape(TOKENS, HEADS, DIM), convention) * turns  # noqa: E731
    source_keys = _complex(rng.normal(size=(TOKENS, KV_HEADS, DIM)), convention) * turns
    group = np.arange(HEADS) // (HEADS // KV_HEADS)
    mapped_keys = alignment.key_scale[group] * source_keys[:, group]
    before = np.einsum("shf,thf->hst", np.conj(rotate(x @ weight)), mapped_keys).real
    turned = turned_queries(weight, alignment, DIM)
    after = np.einsum("shf,thf->hst", np.conj(rotate(x @ turned)), source_keys[:, group]).real
    np.testing.assert_allclose(after, before, rtol=1e-9, atol=1e-9)
    output = rng.normal(size=(HEADS * DIM, 16))
    attended = rng.normal(size=(TOKENS, HEADS, DIM))  # what each head read from source values
    mapped = np.einsum("hij,thj->thi", alignment.value_map[group], attended)
    np.testing.assert_allclose(
        attended.reshape(TOKENS, -1) @ mapped_outputs(output, alignment, DIM),
        mapped.reshape(TOKENS, -1) @ output,
        rtol=1e-9,
        atol=1e-9,
    )


@pytest.fixture(scope="module")
def lm(tmp_path_factory) -> kv_models.GenerationModels:
    return kv_models.shared(tmp_path_factory)


def _distance(lm, plan: ShareKVPlan, folder) -> float:
    """Mean absolute difference of the shared graph's logits from the original's (test text)."""
    path = folder / "model.onnx"
    save_model(apply_plan(lm.export, plan), path)
    carry_manifest(lm.export, path)
    result = evaluate_model(path, tokens=512, seq_len=32, latency_runs=1, reference=lm.export)
    return result["fidelity"]["mean_abs_diff"]


def test_aligned_sharing_is_closer_to_the_original_and_round_trips(lm, tmp_path):
    pairs = [(1, 0), (3, 2)]
    plain = plan_share_kv(lm.export, ShareKVRequest(layers=pairs, align=False))
    aligned = plan_share_kv(lm.export, ShareKVRequest(layers=pairs, data=SMALL_DATA))
    assert set(aligned.alignments) == set(pairs)
    assert all(
        0 <= a.key_residual < 1 and 0 <= a.value_residual < 1 for a in aligned.alignments.values()
    )
    assert _distance(lm, aligned, tmp_path / "aligned") < _distance(lm, plain, tmp_path / "plain")
    saved = aligned.save(tmp_path / "plan.json")
    again = ShareKVPlan.load(saved)
    for pair, alignment in aligned.alignments.items():
        np.testing.assert_array_equal(again.alignments[pair].key_scale, alignment.key_scale)
        np.testing.assert_array_equal(again.alignments[pair].value_map, alignment.value_map)
    saved.with_suffix(".npz").write_bytes(b"not the maps")
    with pytest.raises(PlanError, match="alignment maps do not match the plan's hash"):
        ShareKVPlan.load(saved)
