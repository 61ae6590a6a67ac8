"""fp16/bf16 weights on the CPU provider: lean sessions compute the same and hold no fp32 copies.

The memory check loads each session in a fresh process and reads its anonymous RSS (the
mapped weight file counts as file-backed, not anonymous): a default session folds every fp16
weight into an fp32 copy at load, a lean one does not.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

from layerfuse.export.synthetic import SyntheticConfig, write_synthetic_model
from layerfuse.runtime import widening
from layerfuse.runtime.calibration import ActivationTap
from layerfuse.runtime.session import create_session

SHAPES = {"hidden": 256, "ff": 1024, "heads": 4, "kv_heads": 2, "layers": 4, "vocab": 4000}


@pytest.fixture(scope="module")
def half_model(tmp_path_factory):
    config = SyntheticConfig(**SHAPES, dtype="float16")
    return config, write_synthetic_model(config, tmp_path_factory.mktemp("fp16"))


def _feeds(config: SyntheticConfig) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(0, config.vocab, (2, 9))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def test_widened_bytes_counts_16bit_weights(half_model):
    config, path = half_model
    graph = onnx.load(path, load_external_data=False)
    half = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    assert widening.widened_bytes(graph) == sum(4 * int(np.prod(t.dims)) for t in half)
    assert widening.widened_bytes(graph) >= 4 * 0.98 * config.parameters()  # norms are fp16 too


def test_lean_session_computes_the_same(half_model):
    config, path = half_model
    feeds = _feeds(config)
    full = create_session(path, provider="cpu", lean=False).run(None, feeds)[0]
    lean = create_session(path, provider="cpu", lean=True).run(None, feeds)[0]
    assert lean.dtype == full.dtype
    np.testing.assert_allclose(lean.astype(np.float32), full.astype(np.float32), atol=2e-2)


def test_calibration_taps_are_lean_and_match(half_model):
    config, path = half_model
    graph = onnx.load(path, load_external_data=False)
    names = [n.output[0] for n in graph.graph.node if n.op_type == "Add"][-2:]
    lean = ActivationTap(path, names, provider="cpu", model_outputs=False)
    full = ActivationTap(path, names, provider="cpu", model_outputs=False, lean=False)
    a, b = lean.tapped(_feeds(config)), full.tapped(_feeds(config))
    for name in names:
        got, want = a[name].astype(np.float32), b[name].astype(np.float32)
        np.testing.assert_allclose(got, want, atol=2e-2)


def test_auto_is_lean_only_when_copies_would_not_fit(half_model, monkeypatch):
    _, path = half_model
    widened = widening.widened_bytes(onnx.load(path, load_external_data=False))
    monkeypatch.setattr(widening, "available_memory", lambda: 100 * widened)
    assert not widening.wants_lean(path, None)
    monkeypatch.setattr(widening, "available_memory", lambda: widened)
    assert widening.wants_lean(path, None)
    assert not widening.wants_lean(path, False)


def test_fp32_graphs_are_never_lean(tmp_path):
    config = SyntheticConfig(**{**SHAPES, "layers": 1}, dtype="float32")
    path = write_synthetic_model(config, tmp_path)
    assert widening.widened_bytes(onnx.load(path, load_external_data=False)) == 0
    assert not widening.wants_lean(path, True)


_PROBE = """
import json, sys
from layerfuse.runtime.session import create_session
def anon():
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return int(status["RssAnon"].split()[0]) * 1024
before = anon()
session = create_session(sys.argv[1], provider="cpu", lean=sys.argv[2] == "lean")
print(json.dumps(anon() - before))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_lean_session_holds_no_fp32_copies(half_model):
    _, path = half_model
    widened = widening.widened_bytes(onnx.load(path, load_external_data=False))

    def grown(mode: str) -> int:
        run = [sys.executable, "-c", _PROBE, str(path), mode]
        return json.loads(subprocess.run(run, capture_output=True, check=True, text=True).stdout)

    assert grown("full") >= 0.8 * widened
    assert grown("lean") <= 0.25 * widened
