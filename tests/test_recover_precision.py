"""``--precision bf16``: distillation under bfloat16 autocast trains the same weights as
float32 to bfloat16's precision, and really computes in bfloat16 (the results differ)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from layerfuse.errors import LayerfuseError
from layerfuse.recover.local import LocalSettings
from layerfuse.recover.run import RecoverRequest, recover
from tests.test_local_reconstruction import SETTINGS, _weights, llama, text  # noqa: F401


def test_bf16_autocast_trains_what_fp32_does_within_bf16_precision(llama, text, tmp_path):  # noqa: F811
    original, merged = llama
    steps = replace(SETTINGS, steps=3)
    trained = {}
    for precision in ("fp32", "bf16"):
        request = RecoverRequest(
            original, merged, tmp_path / f"{precision}.onnx", data=str(text),
            settings=replace(steps, precision=precision), local=LocalSettings(steps=0),
        )  # fmt: skip
        summary = recover(request)
        assert summary["steps_done"] == 3
        trained[precision] = _weights(tmp_path / f"{precision}.onnx")
    start = _weights(merged)
    floats = [n for n, w in start.items() if np.issubdtype(w.dtype, np.floating)]
    updates = {
        p: np.concatenate([(trained[p][n] - start[n]).ravel() for n in floats]) for p in trained
    }
    fp32, bf16 = updates["fp32"], updates["bf16"]
    cosine = fp32 @ bf16 / (np.linalg.norm(fp32) * np.linalg.norm(bf16))
    print(f"cosine of the bf16 and fp32 updates: {cosine:.4f}")
    assert np.isfinite(bf16).all() and not np.array_equal(fp32, bf16)
    assert cosine > 0.9


def test_an_unknown_precision_is_one_line():
    with pytest.raises(LayerfuseError, match="unknown --precision 'fp8'"):
        replace(SETTINGS, precision="fp8").check(1)
