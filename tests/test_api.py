"""The Python API: passes compose in memory and give what the file-by-file route gives.

On the tiny Llama (4 blocks): merge then prune without saving in between equals merging,
saving, then pruning the saved file; recovery and quantization take in-memory models;
quantized graphs are refused by the passes themselves; ``import layerfuse`` stays light.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

import layerfuse
from layerfuse.errors import DetectionError, LayerfuseError
from layerfuse.files import STAGING_PREFIX
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.recover.settings import TrainSettings
from layerfuse.runtime.session import create_session
from tests.test_recover import _write_text

MERGE = {"ranges": [(1, 2)], "method": "vanilla"}
PRUNE = {"target": "ff", "blocks": [3]}


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    session = create_session(path, provider="cpu")
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def _staging_left(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_merge_then_prune_in_memory_equals_the_file_route(tiny, tmp_path):
    original = tiny.model("llama")
    model = layerfuse.load(original)
    assert not model.modified and model.file_bytes > 0
    before = model.parameters
    merge_plan = layerfuse.plan_merge(model, **MERGE)
    assert merge_plan.apply(model) is model and model.modified and model.file_bytes is None
    prune_plan = layerfuse.plan_prune(model, **PRUNE)  # planned on a temporary copy
    model.apply(prune_plan).save(tmp_path / "api" / "model.onnx")
    assert [type(p).SCHEMA for p in (merge_plan, prune_plan)] == list(model.history)
    assert not model.modified and model.parameters < before
    assert not _staging_left(original.parent) and not _staging_left(tmp_path / "api")

    step = tmp_path / "files" / "merged" / "model.onnx"
    save_model(apply_plan(original, plan_merge(original, MergeRequest(**MERGE))), step)
    carry_manifest(original, step)
    final = tmp_path / "files" / "final" / "model.onnx"
    save_model(apply_plan(step, plan_prune(step, PruneRequest(**PRUNE))), final)
    carry_manifest(step, final)

    ids = np.random.default_rng(0).integers(0, 100, size=(2, 12), dtype=np.int64)
    np.testing.assert_allclose(_logits(model.path, ids), _logits(final, ids), rtol=1e-5, atol=1e-5)
    assert layerfuse.load(final).parameters == model.parameters
    assert (model.path.parent / "layerfuse.json").is_file()


def test_plans_apply_to_onnx_ir_models_and_requests_are_checked(tiny):
    original = tiny.model("llama")
    plan = layerfuse.plan_merge(layerfuse.load(original), **MERGE)
    graph = load_model(original)
    initializers = len(graph.graph.initializers)
    assert plan.apply(graph) is graph and isinstance(graph, ir.Model)
    assert len(graph.graph.initializers) < initializers
    with pytest.raises(LayerfuseError, match="not both"):
        layerfuse.plan_merge(layerfuse.load(original), MergeRequest(), ratio="1/2")
    with pytest.raises(LayerfuseError, match="no field windowz"):
        layerfuse.plan_merge(layerfuse.load(original), windowz=2)


def test_saved_plans_load_by_their_kind(tiny, tmp_path):
    model = layerfuse.load(tiny.model("llama"))
    path = layerfuse.plan_prune(model, **PRUNE).save(tmp_path / "p.json")
    loaded = layerfuse.load_plan(path)
    assert type(loaded).__name__ == "PrunePlan" and loaded.blocks == [3]


def test_recover_and_quantize_take_in_memory_models(tiny, tmp_path):
    original = layerfuse.load(tiny.model("llama"))
    merged = layerfuse.load(original.path)
    plan = layerfuse.plan_merge(merged, **MERGE)
    plan.apply(merged)
    settings = TrainSettings(
        steps=2, batch_size=2, grad_accum=1, seq_len=32, eval_every=0, patience=0,
        valid_tokens=64,
    )  # fmt: skip
    text = _write_text(tmp_path / "text.txt", 120)
    result = layerfuse.recover_model(
        original, merged, tmp_path / "rec" / "model.onnx", plan=plan, settings=settings,
        data=str(text), train="touched",
    )  # fmt: skip
    assert result.summary["finished"] and result.summary["steps_done"] == 2
    assert result.model.path == tmp_path / "rec" / "model.onnx"
    assert result.model.parameters == merged.parameters
    assert not _staging_left(tmp_path / "rec") and not _staging_left(original.path.parent)

    int4 = layerfuse.quantize(result.model, tmp_path / "q" / "model.onnx", "int4")
    ops = {node.op_type for node in int4.ir.graph}
    assert "MatMulNBits" in ops
    assert int4.parameters == result.model.parameters  # logical weights, not stored bytes
    with pytest.raises(DetectionError, match="linear layers are quantized"):
        layerfuse.plan_merge(int4, **MERGE)
    with pytest.raises(DetectionError, match="linear layers are quantized"):
        plan.apply(layerfuse.load(int4.path))


def test_import_layerfuse_does_not_load_torch_or_onnxruntime():
    code = "import sys, layerfuse; print(sorted({'torch', 'onnxruntime'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert callable(layerfuse.load) and "plan_merge" in dir(layerfuse.api)
    assert sorted(set(layerfuse.__all__) - {"__version__"}) == sorted(layerfuse.api.__all__)


def _readme_example() -> str:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_runs(tiny, tmp_path):
    """The README's API example, run as written on the tiny Llama instead of SmolLM2."""
    code = _readme_example().replace("runs/demo/original/model.onnx", str(tiny.model("llama")))
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    parameters, history = out.stdout.splitlines()[0].split(" ", 1)
    saved = layerfuse.load(tmp_path / "runs" / "api" / "model.onnx")
    assert int(parameters) == saved.parameters < layerfuse.load(tiny.model("llama")).parameters
    assert "merge" in history and "prune" in history
    assert float(out.stdout.splitlines()[1]) > 1
    assert layerfuse.load_plan(tmp_path / "merge.plan.json").windows
