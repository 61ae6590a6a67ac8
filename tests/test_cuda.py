"""The rewritten graphs on ORT's CUDA provider: same numbers as CPU, harness and memory work.

Skipped where the installed onnxruntime has no CUDA provider (plain ``onnxruntime``, CI).
"""

from __future__ import annotations

import numpy as np
import pytest

from layerfuse.data.batches import make_batches
from layerfuse.model.io import save_model
from layerfuse.passes.fuse import FuseRequest, plan_fuse
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.inputs import parse_shapes
from layerfuse.runtime.measure import measure_memory
from layerfuse.runtime.session import PROVIDERS, available_providers, create_session

pytestmark = pytest.mark.skipif(
    PROVIDERS["cuda"] not in available_providers(), reason="onnxruntime has no CUDA provider"
)


def _variants(tiny, tmp_path) -> dict:
    path = tiny.model("llama")
    merge = plan_merge(path, MergeRequest(ranges=[(1, 3)], method="vanilla"))
    fuse = plan_fuse(
        path,
        FuseRequest(
            drop_attention=[2, 3],
            include_last=True,
            data=DataSettings(data="random", calib_tokens=128, valid_tokens=128, seq_len=16),
        ),
    )
    return {
        "original": path,
        "tied": save_model(apply_plan(path, merge), tmp_path / "tied" / "model.onnx"),
        "fused": save_model(apply_plan(path, fuse), tmp_path / "fused" / "model.onnx"),
    }


def test_every_variant_gives_the_cpu_numbers_on_cuda(tiny, tmp_path):
    batch = make_batches(tiny.model("llama"), "random", "calib", tokens=64, seq_len=16)[0]
    for name, path in _variants(tiny, tmp_path).items():
        session = create_session(path, provider="cuda")
        assert session.get_providers()[0] == PROVIDERS["cuda"], name
        on_gpu = session.run(None, batch.feeds)[0]
        on_cpu = create_session(path, provider="cpu").run(None, batch.feeds)[0]
        assert np.max(np.abs(on_gpu - on_cpu)) <= 1e-3, name


def test_harness_times_and_measures_device_memory_on_cuda(tiny, tmp_path):
    variants = _variants(tiny, tmp_path)
    config = BenchConfig(shapes=parse_shapes("1x16,2x32"), provider="cuda", warmup=1, runs=3)
    document = run_bench(list(variants.values()), config, names=list(variants))
    assert document["provider"] == PROVIDERS["cuda"]
    for graph in document["graphs"]:
        assert all(entry["p50_ms"] > 0 for entry in graph["latency"].values())
        assert graph["memory"]["after_run_bytes"] > 0
    feeds = make_batches(variants["original"], "random", "calib", tokens=64, seq_len=16)[0]
    assert measure_memory(variants["original"], feeds.feeds, provider="cuda").after_run_bytes > 0
