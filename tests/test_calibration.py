"""The calibration runner returns the same tensors a torch forward hook sees."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerfuse.data.batches import make_batches
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.runtime.calibration import ActivationTap, stream_rows, token_rows
from tests import tiny_models


def _hooked_outputs(module: torch.nn.Module, model: torch.nn.Module, feeds: dict) -> np.ndarray:
    captured = []
    handle = module.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    handle.remove()
    return captured[0].numpy()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_pre_activation_matches_torch_hook(tiny, exporter):
    path = tiny.model("llama", exporter)
    structure = detect_structure(load_model(path))
    block = structure.blocks[2]
    tap = ActivationTap(path, [block.ff.pre_activation.name], provider="cpu")
    batch = make_batches(path, "random", "calib", tokens=64, seq_len=16, batch_size=4)[0]
    _, tapped = tap.run(batch.feeds)
    model = tiny_models.make_model("llama")
    expected = _hooked_outputs(model.model.layers[2].mlp.gate_proj, model, batch.feeds)
    np.testing.assert_allclose(tapped[block.ff.pre_activation.name], expected, atol=1e-5)


def test_encoder_rows_drop_padding(tiny):
    path = tiny.model("bert")
    structure = detect_structure(load_model(path))
    name = structure.blocks[0].ff.pre_activation.name
    batches = make_batches(path, "fortunes", "calib", tokens=400, seq_len=32, batch_size=8)
    assert any((b.mask == 0).any() for b in batches), "expected some padded rows"
    tap = ActivationTap(path, [name], provider="cpu")
    model = tiny_models.make_model("bert")
    for batch, rows in zip(batches, stream_rows(tap, batches), strict=True):
        assert rows[name].shape == (batch.mask.sum(), tiny_models.INTERMEDIATE)
        hooked = _hooked_outputs(model.encoder.layer[0].intermediate.dense, model, batch.feeds)
        np.testing.assert_allclose(rows[name], token_rows(hooked, batch.mask), atol=1e-5)


def test_token_rows_accepts_flattened_tensors():
    mask = np.array([[1, 1, 0], [1, 0, 0]])
    flat = np.arange(6 * 2, dtype=np.float32).reshape(6, 2)
    assert token_rows(flat, mask).tolist() == [[0, 1], [2, 3], [6, 7]]
    assert token_rows(flat.reshape(2, 3, 2), mask).shape == (3, 2)
