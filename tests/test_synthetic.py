"""Synthetic big-model generator (tiny here) and streaming plan apply.

The generator's Llama-shaped graph runs in onnxruntime, is detected with one block per
layer, and takes merge and prune plans. Applying a saved plan to a model with external data
materializes only the tensors the plan rewrites: the fingerprint check reads sampled elements
with ``pread`` (no mapping), pruning reads no weight, merging reads the merged FFs' weights,
and saving copies every other tensor file to file (``ExternalTensor.tofile``) without
holding it.
"""

from __future__ import annotations

import collections
import shutil

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from layerfuse.export.synthetic import SyntheticConfig, layers_for_bytes, write_synthetic_model
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, save_model, weight_bytes
from layerfuse.model.manifest import read_manifest
from layerfuse.model.stats import model_stats
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest, plan_prune

RANDOM = DataSettings(data="random", calib_tokens=64, valid_tokens=64, seq_len=16, batch_size=4)
TINY = {"hidden": 64, "ff": 128, "heads": 4, "kv_heads": 2, "layers": 4, "vocab": 300}


@pytest.fixture(scope="module", params=["float16", "float32"])
def synthetic(request, tmp_path_factory):
    config = SyntheticConfig(**TINY, dtype=request.param)
    return config, write_synthetic_model(config, tmp_path_factory.mktemp(request.param))


def test_runs_and_is_detected(synthetic):
    config, path = synthetic
    weights = config.parameters() * np.dtype(config.dtype).itemsize
    assert path.with_name("model.onnx.data").stat().st_size >= 0.98 * weights  # norms inline
    ids = np.random.default_rng(0).integers(0, config.vocab, (2, 7))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
    assert logits.shape == (2, 7, config.vocab) and np.isfinite(logits).all()
    structure = detect_structure(load_model(path))
    assert len(structure.blocks) == config.layers
    assert all(b.ff.kind == "swiglu" and b.attention is not None for b in structure.blocks)
    assert read_manifest(path).config["num_layers"] == config.layers


def test_layers_for_bytes():
    config = SyntheticConfig(dtype="float16")  # Llama-3-8B's shapes
    layers = layers_for_bytes(config, 8 << 30)
    sized = SyntheticConfig(dtype="float16", layers=layers)
    assert sized.parameters() * 2 >= 8 << 30 > (sized.parameters() - sized.block_parameters()) * 2


def _watch_external_reads(monkeypatch) -> dict[str, collections.Counter]:
    """Names of external tensors materialized (mapped or read) and copied file to file."""
    seen = {"materialized": collections.Counter(), "copied": collections.Counter()}
    load, tofile = ir.ExternalTensor._load, ir.ExternalTensor.tofile

    def watched_load(self):
        seen["materialized"][self.name] += 1
        return load(self)

    def watched_tofile(self, file):
        seen["copied"][self.name] += 1
        return tofile(self, file)

    monkeypatch.setattr(ir.ExternalTensor, "_load", watched_load)
    monkeypatch.setattr(ir.ExternalTensor, "tofile", watched_tofile)
    return seen


def _ff_weights(path, blocks) -> set[str]:
    structure = detect_structure(load_model(path))
    return {
        linear.weight.name for b in blocks for linear in structure.blocks[b].ff.linears.values()
    }


@pytest.mark.parametrize("operation", ["merge", "prune"])
def test_plan_apply_reads_only_rewritten_tensors(synthetic, operation, monkeypatch, tmp_path):
    config, path = synthetic
    if operation == "merge":
        plan = plan_merge(path, MergeRequest(ranges=[(1, 2)], method="permute", data=RANDOM))
        rewritten = _ff_weights(path, [1, 2])
    else:
        plan = plan_prune(path, PruneRequest(target="ff", blocks=[1]))
        rewritten = set()
    plan_path = plan.save(tmp_path / "plan.json")
    external = {
        name
        for name, value in load_model(path).graph.initializers.items()
        if isinstance(value.const_value, ir.ExternalTensor)
    }
    seen = _watch_external_reads(monkeypatch)
    model = apply_plan(path, type(plan).load(plan_path))
    written = save_model(model, tmp_path / "out" / "model.onnx", external_data=True)
    assert set(seen["materialized"]) == rewritten
    kept = set(load_model(written).graph.initializers) & external
    assert kept - rewritten and set(seen["copied"]) == kept - rewritten
    blocks = config.layers - (operation == "prune")  # a block is one FF and its attention
    assert len(detect_structure(load_model(written)).blocks) == blocks


def test_fingerprint_reads_samples_without_mapping(synthetic, monkeypatch):
    _, path = synthetic
    lazy = load_model(path)
    seen = _watch_external_reads(monkeypatch)
    sampled = fingerprint(lazy)
    assert not seen["materialized"]
    monkeypatch.undo()
    assert sampled == fingerprint(ir.external_data.load_to_model(load_model(path)))


def test_model_stats_reads_weights_without_mapping(synthetic, monkeypatch):
    _, path = synthetic
    seen = _watch_external_reads(monkeypatch)
    streamed = model_stats(path)
    assert not seen["materialized"]
    monkeypatch.undo()
    model = ir.external_data.load_to_model(load_model(path))
    in_memory = save_model(model, path.parent / "inline" / "model.onnx", external_data=False)
    assert model_stats(in_memory).unique_content_bytes == streamed.unique_content_bytes


def test_graph_over_2gb_round_trips(tmp_path):
    """A 3.7 GB graph (weights are file holes: instant, no disk) loads, is detected, takes a
    plan and saves with external data; the 2.8 GB it writes is removed at once."""
    shapes = {"hidden": 4096, "ff": 14336, "heads": 32, "kv_heads": 8, "vocab": 32000}
    config = SyntheticConfig(**shapes, layers=3, dtype="float32", sparse=True)
    path = write_synthetic_model(config, tmp_path / "source")
    assert weight_bytes(load_model(path)) > 3 * 2**30
    plan = plan_prune(path, PruneRequest(target="block", blocks=[1]))
    try:
        written = save_model(apply_plan(path, plan), tmp_path / "out" / "model.onnx")
        assert written.with_name("model.onnx.data").stat().st_size > 2**31
        assert written.stat().st_size < 2**20  # the graph itself stays small
        model = load_model(written)
        assert weight_bytes(model) > 2**31 and len(detect_structure(model).blocks) == 2
        embedding = model.graph.initializers["model.embed_tokens.weight"].const_value
        assert not np.asarray(embedding.numpy()[:2]).any()
    finally:
        shutil.rmtree(tmp_path, ignore_errors=True)
