"""layerfuse's Olive passes in real Olive workflows on the tiny Llama (4 blocks).

Merge then Olive's OnnxPeepholeOptimizer gives the model the Python API gives (parameters,
logits in onnxruntime, plan history), with the manifest, tokenizer and plan in Olive's output
folder; a layerfuse pass after an Olive pass still finds the manifest (carried as
``additional_files``); pass options are the request dataclasses' fields.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("OLIVE_DISABLE_TELEMETRY", "1")
pytest.importorskip("olive", reason="Olive is an optional extra: pip install layerfuse[olive]")

import layerfuse
from layerfuse.errors import LayerfuseError
from layerfuse.integrations import olive as lf_olive
from layerfuse.passes.merge import MergeRequest
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest
from tests.test_api import MERGE, PRUNE, _logits


def _workflow(tmp_path: Path, source: Path, passes: dict) -> Path:
    """Run Olive on ``source`` and return the output model's path."""
    result = lf_olive.run(
        {
            "input_model": lf_olive.input_model(source),
            "passes": passes,
            "cache_dir": str(tmp_path / "cache"),
            "output_dir": str(tmp_path / "out"),
            "log_severity_level": 3,
        }
    )
    best = result.get_best_candidate()
    assert best is not None
    path = Path(best.model_path)
    return path / best.model_config["onnx_file_name"] if path.is_dir() else path


def _api_result(source: Path, folder: Path, **plans: dict) -> layerfuse.Model:
    model = layerfuse.load(source)
    for kind, options in plans.items():
        getattr(layerfuse, f"plan_{kind}")(model, **options).apply(model)
    return model.save(folder / "model.onnx")


def test_merge_then_an_olive_pass_equals_the_api(tiny, tmp_path):
    source = tiny.model("llama")
    expected = _api_result(source, tmp_path / "api", merge=MERGE)
    passes = {
        "merge": {"type": "LayerfuseMerge", "ranges": [[1, 2]], "method": "vanilla"},
        "peephole": {"type": "OnnxPeepholeOptimizer"},
    }
    output = _workflow(tmp_path, source, passes)

    result = layerfuse.load(output)
    assert result.parameters == expected.parameters < layerfuse.load(source).parameters
    plan = layerfuse.load_plan(output.parent / "merge.plan.json")
    assert result.history == expected.history == (type(plan).SCHEMA,)
    assert result.manifest == layerfuse.load(source).manifest
    assert (output.parent / "tokenizer" / "tokenizer.json").is_file()
    ids = np.random.default_rng(0).integers(0, 100, size=(2, 12), dtype=np.int64)
    np.testing.assert_allclose(
        _logits(output, ids), _logits(expected.path, ids), rtol=1e-4, atol=1e-4
    )


def test_a_layerfuse_pass_after_an_olive_pass_finds_the_manifest(tiny, tmp_path):
    source = tiny.model("llama")
    expected = _api_result(source, tmp_path / "api", prune=PRUNE)
    passes = {
        "peephole": {"type": "OnnxPeepholeOptimizer"},
        "prune": {"type": "LayerfusePrune", "target": "ff", "blocks": [3]},
    }
    output = _workflow(tmp_path, source, passes)
    result = layerfuse.load(output)
    assert result.parameters == expected.parameters
    assert layerfuse.load_plan(output.parent / "prune.plan.json").blocks == [3]
    assert (output.parent / "layerfuse.json").is_file()


def test_pass_options_are_the_request_fields():
    pairs = [(lf_olive.LayerfuseMerge, MergeRequest), (lf_olive.LayerfusePrune, PruneRequest)]
    for cls, request in pairs:
        params = lf_olive.request_config(cls.request)
        assert cls.request is request
        assert list(params) == [f.name for f in dataclasses.fields(request)]
        assert params["data"].default_value is None
    assert lf_olive.request_config(MergeRequest)["ratio"].default_value == "1/3"

    built = lf_olive.build_request(MergeRequest, {"ranges": [(1, 2)], "data": {"seq_len": 64}})
    assert built.ranges == [(1, 2)] and built.data.seq_len == 64
    assert built.data.calib_tokens == MergeRequest().data.calib_tokens  # the request's default
    assert isinstance(lf_olive.build_request(PruneRequest, {}).data, DataSettings)
    with pytest.raises(LayerfuseError, match="no field seqlen"):
        lf_olive.build_request(MergeRequest, {"data": {"seqlen": 64}})

    config = lf_olive.package_config()
    assert config["passes"]["LayerfuseMerge"]["module_path"] == (
        "layerfuse.integrations.olive.LayerfuseMerge"
    )
    assert "OnnxPeepholeOptimizer" in config["passes"]  # Olive's own passes stay known
