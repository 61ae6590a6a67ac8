"""The packaged real models: export equivalence, detection, calibration against torch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerfuse.data.batches import make_batches
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.runtime.calibration import ActivationTap

pytestmark = pytest.mark.slow


def test_smollm2_exports_within_tolerance_and_has_30_swiglu_ffs(real):
    result = real.export("smollm2-135m")
    assert result.max_abs_diff <= 1e-3
    structure = detect_structure(load_model(result.model_path))
    assert len(structure.blocks) == 30
    for block in structure.blocks:
        assert block.ff.kind == "swiglu"
        assert (block.ff.model_dim, block.ff.width) == (576, 1536)
        assert block.ff.parameter_count == 3 * 576 * 1536
        assert block.ff_wiring.norm_position == "pre"
        assert block.attention is not None and len(block.attention.projections) == 3


def test_minilm_exports_within_tolerance_and_has_6_gelu_ffs(real):
    result = real.export("minilm-l6")
    assert result.max_abs_diff <= 1e-3
    structure = detect_structure(load_model(result.model_path))
    assert [b.ff.kind for b in structure.blocks] == ["gelu"] * 6
    assert all((b.ff.model_dim, b.ff.width) == (384, 1536) for b in structure.blocks)
    assert all(b.ff_wiring.norm_position == "post" for b in structure.blocks)
    assert structure.blocks[0].ff.parameter_count == 384 * 1536 * 2 + 1536 + 384


def test_smollm2_calibration_matches_torch_hook(real):
    path = real.model("smollm2-135m")
    block = detect_structure(load_model(path)).blocks[17]
    batch = make_batches(path, "fortunes", "calib", tokens=128, seq_len=32, batch_size=2)[0]
    tap = ActivationTap(path, [block.ff.pre_activation.name], provider="cpu")
    _, tapped = tap.run(batch.feeds)
    model = real.source("smollm2-135m").model
    captured = []
    hook = model.model.layers[17].mlp.gate_proj.register_forward_hook(
        lambda _m, _i, out: captured.append(out.detach().numpy())
    )
    with torch.no_grad():
        model(**{k: torch.from_numpy(v) for k, v in batch.feeds.items()}, use_cache=False)
    hook.remove()
    np.testing.assert_allclose(tapped[block.ff.pre_activation.name], captured[0], atol=2e-3)
