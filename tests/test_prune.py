"""Layer pruning: equal to torch with the layers deleted, exact parameter counts, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from layerfuse.cli import main
from layerfuse.data.batches import make_batches
from layerfuse.errors import PlanError
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.ff_weights import read_ff_weights
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.merge.tie import tie_weights
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PrunePlan, PruneRequest, plan_prune
from layerfuse.runtime.session import session_for_ir
from tests import tiny_models


def _batch(path):
    return make_batches(path, "random", "calib", tokens=64, seq_len=16, batch_size=4)[0]


def _run(model, path, feeds) -> np.ndarray:
    return session_for_ir(model, path.parent, provider="cpu").run(None, feeds)[0]


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_block_pruning_equals_torch_without_those_layers(tiny, family):
    path = tiny.model(family)
    plan = plan_prune(path, PruneRequest(target="block", blocks=[1, 2]))
    feeds = _batch(path).feeds
    pruned = _run(apply_plan(path, plan), path, feeds)
    model = tiny_models.make_model(family)
    layers = model.model.layers if family == "llama" else model.encoder.layer
    kept = [layer for i, layer in enumerate(layers) if i not in (1, 2)]
    if family == "llama":
        model.model.layers = torch.nn.ModuleList(kept)
        model.config.num_hidden_layers = len(kept)
    else:
        model.encoder.layer = torch.nn.ModuleList(kept)
    extra = {"use_cache": False} if family == "llama" else {}
    with torch.no_grad():
        inputs = {k: torch.from_numpy(v) for k, v in feeds.items()}
        expected = model(**inputs, **extra)[0].numpy()
    np.testing.assert_allclose(pruned, expected, atol=1e-4)


def _zero_ff(model, index: int) -> None:
    ff = detect_structure(model).blocks[index].ff
    weights = read_ff_weights(ff)
    weights.matrices["down"] = np.zeros_like(weights.matrices["down"])
    if "down" in weights.biases:
        weights.biases["down"] = np.zeros_like(weights.biases["down"])
    tie_weights(model.graph, [ff], weights, f"zero.{index}")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_ff_pruning_equals_a_zero_output_ff(tiny, family):
    path = tiny.model(family)
    feeds = _batch(path).feeds
    plan = plan_prune(path, PruneRequest(target="ff", blocks=[0, 3]))
    pruned = _run(apply_plan(path, plan), path, feeds)
    zeroed = load_model(path)
    _zero_ff(zeroed, 0)
    _zero_ff(zeroed, 3)
    np.testing.assert_allclose(pruned, _run(zeroed, path, feeds), atol=1e-5)


def test_parameter_counts_are_exact(tiny):
    path = tiny.model("llama")
    structure = detect_structure(load_model(path))
    block = structure.blocks[2]
    norm = tiny_models.HIDDEN  # each sublayer's RMSNorm gain dies with it
    ff = plan_prune(path, PruneRequest(target="ff", blocks=[2]))
    assert ff.parameters_removed == block.ff.parameter_count + norm
    attention = plan_prune(path, PruneRequest(target="attention", blocks=[2]))
    assert attention.parameters_removed == block.attention.parameter_count + norm
    whole = plan_prune(path, PruneRequest(target="block", blocks=[2]))
    assert whole.parameters_removed == ff.parameters_removed + attention.parameters_removed


def test_influence_selection_drops_the_least_influential(tiny):
    path = tiny.model("llama")
    request = PruneRequest(
        target="block",
        count=2,
        data=DataSettings(data="random", calib_tokens=256, valid_tokens=256, seq_len=16),
    )
    plan = plan_prune(path, request)
    scores = plan.selection["scores"]
    assert len(scores) == tiny_models.LAYERS and all(0 <= s <= 2 for s in scores)
    assert plan.blocks == sorted(np.argsort(scores)[:2].tolist())


def test_sliding_selection_and_merge_budget(tiny, tmp_path):
    path = tiny.model("llama")
    merge = plan_merge(path, MergeRequest(ranges=[(0, 2)], method="vanilla"))
    merge.save(tmp_path / "merge.plan.json")
    out = tmp_path / "pruned" / "model.onnx"
    assert (
        main(
            [
                "prune",
                str(path),
                "-o",
                str(out),
                "--target",
                "ff",
                "--select",
                "sliding",
                "--match-plan",
                str(tmp_path / "merge.plan.json"),
                "--data",
                "random",
            ]
        )
        == 0
    )
    saved = json.loads(out.with_suffix(".plan.json").read_text())
    assert len(saved["blocks"]) == 2 and saved["blocks"][1] == saved["blocks"][0] + 1
    # Same FF budget; pruning also frees the two dropped FFs' norm gains.
    assert saved["parameters_removed"] == merge.parameters_removed + 2 * tiny_models.HIDDEN
    assert len(saved["selection"]["candidates"]) == tiny_models.LAYERS - 1
    again = PrunePlan.load(out.with_suffix(".plan.json"))
    assert again.blocks == saved["blocks"]


def test_bad_prune_requests_are_clear_errors(tiny, tmp_path, capsys):
    path = tiny.model("llama")
    with pytest.raises(PlanError, match="would leave no transformer block"):
        plan_prune(path, PruneRequest(target="block", blocks=[0, 1, 2, 3]))
    out = tmp_path / "x" / "model.onnx"
    for extra, message in (
        (["--blocks", "0,1,2,3"], "would leave no"),
        (["--blocks", "7"], "block 7 is out of range for a model of 4 blocks"),
        (["--count", "4"], "would leave no"),
        ([], "say how much to prune"),
    ):
        capsys.readouterr()
        assert main(["prune", str(path), "-o", str(out), *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not out.parent.exists()


def test_pruning_the_last_block_keeps_the_output_name(tiny):
    path = tiny.model("bert")
    model = apply_plan(path, plan_prune(path, PruneRequest(target="block", blocks=[3])))
    assert [o.name for o in model.graph.outputs] == ["last_hidden_state"]
