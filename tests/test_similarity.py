"""CKA: a layer with itself is 1, neuron permutations do not change it, matrices are sound."""

from __future__ import annotations

import json

import numpy as np

from layerfuse.cli import main
from layerfuse.passes.similarity import MinibatchCKA, hsic_unbiased


def _cka(x: np.ndarray, y: np.ndarray) -> float:
    cka = MinibatchCKA(["x", "y"])
    for start in range(0, len(x), 300):
        cka.update({"x": x[start : start + 300], "y": y[start : start + 300]})
    return float(cka.matrix()[0, 1])


def test_cka_of_a_layer_with_itself_is_one():
    x = np.random.default_rng(0).standard_normal((1200, 24))
    assert abs(_cka(x, x) - 1.0) < 1e-12


def test_cka_is_invariant_to_permuting_and_scaling_neurons():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((1200, 24))
    y = np.tanh(x @ rng.standard_normal((24, 32)))
    permuted = y[:, rng.permutation(32)] * 3.0
    assert abs(_cka(x, y) - _cka(x, permuted)) < 1e-10
    assert abs(_cka(y, permuted) - 1.0) < 1e-10


def test_cka_separates_related_from_independent_representations():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1500, 16))
    related = x @ rng.standard_normal((16, 16)) + 0.1 * rng.standard_normal((1500, 16))
    independent = rng.standard_normal((1500, 16))
    assert _cka(x, related) > 0.5 > 0.05 > abs(_cka(x, independent))


def test_unbiased_hsic_matches_its_definition():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((10, 3)), rng.standard_normal((10, 4))
    k, m = a @ a.T, b @ b.T
    n = 10
    kt, mt = k - np.diag(np.diag(k)), m - np.diag(np.diag(m))
    ones = np.ones(n)
    expected = (
        np.trace(kt @ mt)
        + (ones @ kt @ ones) * (ones @ mt @ ones) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * ones @ kt @ mt @ ones
    ) / (n * (n - 3))
    assert abs(hsic_unbiased(k, m) - expected) < 1e-9


def test_analyze_writes_matrices_and_heatmaps(tiny, tmp_path, capsys):
    path = tiny.model("llama")
    out = tmp_path / "analysis"
    assert (
        main(["analyze", str(path), "--data", "random", "--calib-tokens", "512", "--out", str(out)])
        == 0
    )
    data = json.loads((out / "cka.json").read_text())
    for kind in ("ff", "attention"):
        matrix = np.asarray(data[kind]["cka"])
        assert matrix.shape == (4, 4)
        np.testing.assert_allclose(np.diag(matrix), 1.0, atol=1e-9)
        np.testing.assert_allclose(matrix, matrix.T)
        assert (out / f"cka_{kind}.png").stat().st_size > 5000
    assert "mean CKA of adjacent blocks" in capsys.readouterr().out
