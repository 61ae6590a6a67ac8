"""Memory figures do not depend on what ran before: the same bytes measure the same."""

from __future__ import annotations

import shutil

from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.runtime.inputs import parse_shapes, synthetic_feeds
from layerfuse.runtime.measure import measure_memory


def test_a_hot_and_a_cold_copy_of_one_model_measure_the_same(tiny, tmp_path):
    source = tiny.model("llama")
    hot = save_model(load_model(source), tmp_path / "hot" / "model.onnx", external_data=True)
    carry_manifest(source, hot)
    shutil.copytree(hot.parent, tmp_path / "cold")
    cold = tmp_path / "cold" / "model.onnx"
    for name in ("model.onnx", "model.onnx.data"):  # the hot copy's pages in the cache
        (hot.parent / name).read_bytes()
    feeds = synthetic_feeds(hot, parse_shapes("1x16")[0])
    first, second = (measure_memory(path, feeds, provider="cpu") for path in (hot, cold))
    assert abs(first.after_run_bytes - second.after_run_bytes) <= 256 * 1024
    assert first.after_run_bytes > 0
