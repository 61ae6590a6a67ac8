"""FF detection on tiny models of four families, from both torch exporters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.errors import DetectionError, PlanError
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PrunePlan
from tests import graphs, tiny_models
from tests.conftest import EXPORTERS

EXPECTED_KIND = {"llama": "swiglu", "gpt2": "gelu_tanh", "bert": "gelu", "vit": "gelu"}
EXPECTED_WIDTH = {"llama": 64, "gpt2": 128, "bert": 64, "vit": 64}
EXPECTED_NORM = {"llama": "pre", "gpt2": "pre", "bert": "post", "vit": "pre"}
# GPT-2 projects q, k and v with one fused Conv1D.
EXPECTED_PROJECTIONS = {"llama": 3, "gpt2": 1, "bert": 3, "vit": 3}


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("family", ["llama", "gpt2", "bert", "vit"])
def test_every_ff_is_found_with_its_weights(tiny, family, exporter):
    structure = detect_structure(load_model(tiny.model(family, exporter)))
    assert len(structure.blocks) == tiny_models.LAYERS
    torch_counts = tiny_models.mlp_parameter_count(tiny_models.make_model(family), family)
    for block, torch_count in zip(structure.blocks, torch_counts, strict=True):
        ff = block.ff
        assert ff.kind == EXPECTED_KIND[family]
        assert (ff.model_dim, ff.width) == (tiny_models.HIDDEN, EXPECTED_WIDTH[family])
        assert ff.parameter_count == torch_count
        for role, linear in ff.linears.items():
            expected = (ff.width, ff.model_dim) if role == "down" else (ff.model_dim, ff.width)
            assert linear.read_weight().shape == expected
        assert block.ff_wiring.norm_position == EXPECTED_NORM[family]
        assert block.attention is not None
        assert len(block.attention.projections) == EXPECTED_PROJECTIONS[family]
        assert block.attention_wiring.residual is not None


@pytest.mark.parametrize("exporter", EXPORTERS)
def test_ff_weights_match_torch(tiny, exporter):
    model = tiny_models.make_model("llama")
    structure = detect_structure(load_model(tiny.model("llama", exporter)))
    for block, layer in zip(structure.blocks, model.model.layers, strict=True):
        linears = block.ff.linears
        for role, module in (
            ("gate", layer.mlp.gate_proj),
            ("up", layer.mlp.up_proj),
            ("down", layer.mlp.down_proj),
        ):
            np.testing.assert_array_equal(
                linears[role].read_weight(), module.weight.detach().numpy().T
            )


def test_structure_json_is_stable(tiny, capsys):
    assert main(["inspect", str(tiny.model("gpt2")), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "layerfuse.structure/2"
    assert data["num_blocks"] == tiny_models.LAYERS
    block = data["blocks"][1]
    assert set(block) == {"index", "module", "ff", "attention"}
    assert set(block["ff"]["linears"]) == {"up", "down"}
    assert block["ff"]["linears"]["up"]["shape"] == [tiny_models.HIDDEN, 128]
    assert block["module"] == "transformer.h.1.mlp"


def test_inspect_prints_a_table(tiny, capsys):
    assert main(["inspect", str(tiny.model("llama"))]) == 0
    out = capsys.readouterr().out
    assert out.count("swiglu") == tiny_models.LAYERS


def test_graph_without_ff_is_a_clear_error(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.FLOAT, [4, 4], np.ones(16, np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="only")],
        "no_ff",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weight],
    )
    path = tmp_path / "linear.onnx"
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10), path
    )
    with pytest.raises(DetectionError, match="MatMul 'only': reads the graph input 'x'"):
        detect_structure(load_model(path))
    assert main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerfuse: error: no feed-forward sublayer")
    # --explain lists every rejected candidate, then the same one-line error.
    assert main(["inspect", str(path), "--explain", "--json"]) == 2
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["explain"]
    assert [(r["part"], r["found"]) for r in rows] == [("FF candidate MatMul 'only'", False)]
    assert "no up-projection" in rows[0]["why"]
    assert len(captured.err.strip().splitlines()) == 1


def test_inspect_explain_says_what_was_found_per_block_and_why(tiny, capsys):
    path = tiny.model("llama")
    assert main(["inspect", str(path), "--explain", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["explain"]
    wanted = {"FF", "FF norm", "FF residual", "attention", "attention norm", "attention residual"}
    for index in range(tiny_models.LAYERS):
        parts = {row["part"]: row for row in rows if row["block"] == index}
        assert set(parts) == wanted and all(row["found"] for row in parts.values())
        assert parts["FF"]["why"].startswith("swiglu: down-projection MatMul")
        assert "rms norm before it" in parts["FF norm"]["why"]
        assert "(norm position: pre)" in parts["FF residual"]["why"]
    # Linear layers that are not down-projections (q/k/v, LM head) are each given a reason.
    others = [row for row in rows if row["block"] is None]
    assert len(others) >= 4 * tiny_models.LAYERS and not any(row["found"] for row in others)
    assert all(row["why"] for row in others)
    assert main(["inspect", str(path), "--explain"]) == 0
    assert "why each part was (not) recognised" in capsys.readouterr().out


def _stack_without_last_residual(tmp_path) -> Path:
    """Two FF blocks whose second FF output is the graph output: no residual Add."""
    import onnx

    path = graphs.ff_stack(tmp_path / "stack.onnx", [8, 8])
    model = onnx.load(path)
    nodes = model.graph.node
    last_add = next(node for node in nodes if node.output[0] == "b1.out")
    nodes.remove(last_add)
    next(node for node in nodes if node.op_type == "Identity").input[0] = "b1.d"
    onnx.save(model, path)
    return path


def test_rewrites_refuse_a_sublayer_they_cannot_trace_in_one_line(tmp_path):
    path = _stack_without_last_residual(tmp_path)
    structure = detect_structure(load_model(path))
    assert [block.ff_wiring.residual is None for block in structure.blocks] == [False, True]
    assert "no residual: no Add puts 'b1.d' back" in structure.blocks[1].ff_wiring.notes[-1]
    assert structure.blocks[0].attention is None
    fingerprint, count = structure.fingerprint, len(structure.blocks)
    for plan, message in (
        (PrunePlan(fingerprint, count, "ff", [1]), "block 1: cannot remove its FF sublayer: "),
        (PrunePlan(fingerprint, count, "attention", [0]), "block 0 has no attention sublayer"),
        (FusePlan(fingerprint, count, [], [(0, 1)]), "block 1: cannot fuse its FFN: no residual"),
    ):
        with pytest.raises(PlanError) as error:
            apply_plan(path, plan)
        assert str(error.value).startswith(message) and "\n" not in str(error.value)
    apply_plan(path, PrunePlan(fingerprint, count, "ff", [0]))


def test_graphs_fused_by_the_onnxruntime_optimizer_are_read_and_merged(tiny, tmp_path):
    from onnxruntime.transformers.optimizer import optimize_model

    from layerfuse.data.batches import make_batches
    from layerfuse.model.manifest import carry_manifest
    from layerfuse.passes.merge import MergeRequest, plan_merge
    from layerfuse.runtime.session import session_for_ir

    path = tiny.model("llama")
    optimized = tmp_path / "optimized" / "model.onnx"
    optimized.parent.mkdir()
    optimize_model(
        str(path), model_type="gpt2", num_heads=4, hidden_size=32, opt_level=0
    ).save_model_to_file(str(optimized))
    carry_manifest(path, optimized)
    structure = detect_structure(load_model(optimized))
    assert [b.ff.kind for b in structure.blocks] == ["swiglu"] * tiny_models.LAYERS
    residuals = {b.ff_wiring.residual.node.op_type for b in structure.blocks}
    assert residuals == {"SkipSimplifiedLayerNormalization"}
    batch = make_batches(path, "random", "calib", tokens=64, seq_len=16, batch_size=4)[0]
    outputs = []
    for graph in (path, optimized):
        plan = plan_merge(graph, MergeRequest(ranges=[(1, 2)], method="vanilla"))
        merged = apply_plan(graph, plan)
        outputs.append(
            session_for_ir(merged, graph.parent, provider="cpu").run(None, batch.feeds)[0]
        )
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-4)
    # Rewrites of the residual stream split the fused residual norms back into Add + norm
    # first, so they compute what the same rewrite of the unfused graph computes.
    from layerfuse.passes.fuse import FusePlan
    from layerfuse.passes.prune import PrunePlan

    def plans(graph):
        found = detect_structure(load_model(graph))
        count = len(found.blocks)
        return [
            PrunePlan(found.fingerprint, count, "ff", [1]),
            PrunePlan(found.fingerprint, count, "attention", [2]),
            FusePlan(found.fingerprint, count, [2, 3], [(1, 3)]),
        ]

    for plain, fused in zip(plans(path), plans(optimized), strict=True):
        rewritten = [apply_plan(path, plain), apply_plan(optimized, fused)]
        assert not any(n.op_type.startswith("Skip") for n in rewritten[1].graph)
        results = [
            session_for_ir(model, graph.parent, provider="cpu").run(None, batch.feeds)[0]
            for model, graph in zip(rewritten, (path, optimized), strict=True)
        ]
        np.testing.assert_allclose(results[0], results[1], atol=1e-4)
