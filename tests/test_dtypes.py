"""fp16 and bf16 graphs through merge, prune and fuse, against torch's same surgery.

fp16: the tiny llama converted by layerfuse's own converter (fp16 weights and compute, float32
logits behind one Cast), planned with calibration and rewritten; onnxruntime's output must
equal the torch reference of the same surgery (done in float32) within fp16's tolerance.

bf16: onnxruntime's CPU provider has no bf16 kernel for MatMul, Add, Mul, Pow, Sqrt, Sigmoid
or ReduceMean (1.32), so a bf16 llama cannot run here. The rewritten bf16 graph is checked
instead (every float initializer stays bf16) and then widened to float32, which is exact for
bf16 values: the widened graph must equal torch with bf16-rounded weights and the surgery
done in float32, within bf16's rounding of the rewritten (averaged, folded) weights.

Weights stored fp16 behind a Cast to float32 (mixed-precision exports) must be found by
detection and rewritten like any others.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.merge.correlation import PairStatistics, align
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.runtime.session import session_for_ir
from layerfuse.toolchain.fp16 import convert_fp16
from tests import family_references, tiny_models

RANDOM = DataSettings(data="random", calib_tokens=64, valid_tokens=64, seq_len=16, batch_size=4)
FUSE = {"drop": [1, 2], "runs": [(1, 2)]}
# Graph -> the precision its weights were stored in (the torch reference rounds to it).
ROUNDING = {"bf16": torch.bfloat16, "cast": torch.float16}
OPERATIONS = ("merge", "prune block", "prune ff", "prune attention", "fuse")
# Relative to the largest |logit|. The fp16 graph computes in fp16; the widened bf16 graph
# and the Cast graph compute in float32 and differ from torch only by the rounding of the
# weights a rewrite writes (averaged, gain-folded): 8 bits for bf16.
TOLERANCE = {ir.DataType.FLOAT16: 1e-2, ir.DataType.BFLOAT16: 3e-3, ir.DataType.FLOAT: 1e-3}


def retype(model: ir.Model, source: ir.DataType, target: ir.DataType) -> None:
    """Every ``source`` tensor, value type and Cast of ``model`` made ``target`` in place."""
    numpy_target = target.numpy()
    for value in model.graph.initializers.values():
        if value.const_value.dtype == source:
            data = value.const_value.numpy().astype(np.float32).astype(numpy_target)
            value.const_value = ir.tensor(data, name=value.name)
            value.dtype = target
    for node in model.graph.all_nodes():
        for attribute in node.attributes.values():
            if attribute.type == ir.AttributeType.TENSOR and attribute.value.dtype == source:
                data = attribute.value.numpy().astype(np.float32).astype(numpy_target)
                node.attributes[attribute.name] = ir.AttrTensor(attribute.name, ir.tensor(data))
            elif attribute.name == "to" and attribute.value == source:
                node.attributes["to"] = ir.AttrInt64("to", target)
        for value in node.outputs:
            if value.dtype == source:
                value.dtype = target
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.dtype == source:
            value.dtype = target


def float32_rotary(model: ir.Model, dtype: ir.DataType) -> None:
    """Run Sin and Cos (the rotary tables, which ONNX's opset 18 has no bf16 schema for) in
    float32 between Casts, as torch's bf16 exports compute them."""
    for node in list(model.graph):
        if node.op_type not in ("Sin", "Cos") or node.inputs[0].dtype != dtype:
            continue
        name = node.name or node.op_type
        up = ir.node("Cast", [node.inputs[0]], {"to": ir.DataType.FLOAT}, name=f"{name}.up")
        up.outputs[0].dtype = ir.DataType.FLOAT
        model.graph.insert_before(node, up)
        node.replace_input_with(0, up.outputs[0])
        result = node.outputs[0]
        down = ir.node("Cast", [result], {"to": dtype}, name=f"{name}.down")
        down.outputs[0].dtype, down.outputs[0].shape = dtype, result.shape
        result.replace_all_uses_with(down.outputs[0])
        down.replace_input_with(0, result)
        result.dtype = ir.DataType.FLOAT
        model.graph.insert_after(node, down)


def _bf16(model: ir.Model) -> None:
    retype(model, ir.DataType.FLOAT, ir.DataType.BFLOAT16)
    float32_rotary(model, ir.DataType.BFLOAT16)


def weights_behind_casts(model: ir.Model) -> None:
    """Store every 2-D float32 MatMul weight as fp16, read through a Cast to float32."""
    for node in list(model.graph):
        weight = node.inputs[1] if node.op_type == "MatMul" else None
        if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
            continue
        stored = ir.Value(name=f"{weight.name}.fp16")
        stored.const_value = ir.tensor(weight.const_value.numpy().astype(np.float16))
        model.graph.register_initializer(stored)
        cast = ir.node("Cast", [stored], {"to": ir.DataType.FLOAT}, name=f"{weight.name}.cast")
        model.graph.insert_before(node, cast)
        node.replace_input_with(1, cast.outputs[0])


def _variant(source: Path, out: Path, edit) -> Path:
    model = load_model(source)
    edit(model)
    save_model(model, out)
    carry_manifest(source, out)
    return out


@pytest.fixture(scope="module")
def graphs(tiny, tmp_path_factory) -> dict[str, Path]:
    """The tiny llama as float32, fp16 (layerfuse's converter), bf16 (every float32 tensor,
    type and Cast of the export made bf16, bf16 logits included, the rotary tables computed
    in float32: valid ONNX by the full checker) and fp16 weights behind Casts."""
    root = tmp_path_factory.mktemp("dtypes")
    fp32 = tiny.model("llama")
    fp16 = convert_fp16(fp32, root / "fp16" / "model.onnx").path
    bf16 = _variant(
        fp32,
        root / "bf16" / "model.onnx",
        _bf16,
    )
    cast = _variant(fp32, root / "cast" / "model.onnx", weights_behind_casts)
    return {"fp32": fp32, "fp16": fp16, "bf16": bf16, "cast": cast}


def _reference_model(dtype: torch.dtype, permutations: dict[int, list[int]]):
    """tiny_models.make_model with parameters rounded to ``dtype`` (kept float32) and the
    FF neurons of the given blocks permuted as a merge plan permutes them."""
    make = tiny_models.make_model

    def build(family: str) -> torch.nn.Module:
        model = make(family)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.to(dtype).float())
            for block, permutation in permutations.items():
                mlp = model.model.layers[block].mlp
                order = torch.as_tensor(permutation)
                for linear in (mlp.gate_proj, mlp.up_proj):
                    linear.weight.copy_(linear.weight[order])
                mlp.down_proj.weight.copy_(mlp.down_proj.weight[:, order])
        return model

    return build


def _plan(path: Path, operation: str, calibrated: bool):
    """A plan made by the planner on ``path`` itself (calibrated: onnxruntime runs the
    graph), or fixed choices for graphs onnxruntime cannot run (bf16 on CPU)."""
    if operation == "merge":
        method = "permute" if calibrated else "vanilla"
        return plan_merge(path, MergeRequest(ranges=[(1, 2)], method=method, data=RANDOM))
    if operation.startswith("prune"):
        target = operation.split()[1]
        if calibrated:
            return plan_prune(path, PruneRequest(target=target, count=1, data=RANDOM))
        return plan_prune(path, PruneRequest(target=target, blocks=[1]))
    structure = detect_structure(load_model(path))
    return FusePlan(structure.fingerprint, len(structure.blocks), FUSE["drop"], FUSE["runs"])


def _surgery(operation: str, plan) -> tuple[dict, dict[int, list[int]]]:
    """(what :func:`family_references.run` takes, the merge's neuron permutations)."""
    if operation == "merge":
        window = plan.windows[0]
        how = {"operation": "merge", "blocks": window.blocks}
        return how, {int(b): list(p) for b, p in window.permutations.items()}
    if operation.startswith("prune"):
        return {"operation": "prune", "target": plan.target, "blocks": plan.blocks}, {}
    return {"operation": "fuse", **FUSE}, {}


def _weight_dtypes(model: ir.Model) -> set[ir.DataType]:
    return {
        value.const_value.dtype
        for value in model.graph.initializers.values()
        if value.const_value is not None and len(value.const_value.shape) == 2
    }


def _check(path: Path, model: ir.Model, dtype: ir.DataType, operation: str, plan, monkeypatch):
    """onnxruntime's output of ``model`` equals torch's same surgery within ``dtype``'s
    tolerance, and the surgery moves the output by more than that (the check can fail)."""
    if dtype == ir.DataType.BFLOAT16:
        retype(model, ir.DataType.BFLOAT16, ir.DataType.FLOAT)
    how, permutations = _surgery(operation, plan)
    rounding = ROUNDING.get(path.parent.name, torch.float32)
    monkeypatch.setattr(tiny_models, "make_model", _reference_model(rounding, permutations))
    inputs, mask = family_references.feeds("llama")
    actual = session_for_ir(model, path.parent, provider="cpu").run(None, inputs)[0]
    expected = family_references.run("llama", inputs, **how)
    original = family_references.run("llama", inputs, "none")
    bound = TOLERANCE[dtype] * float(np.abs(expected[mask]).max())
    assert float(np.abs(actual.astype(np.float64) - expected)[mask].max()) < bound
    assert float(np.abs(original - expected)[mask].max()) > bound


@pytest.mark.parametrize("operation", OPERATIONS)
def test_fp16_graph_planned_and_rewritten_equals_torch(graphs, monkeypatch, operation):
    path = graphs["fp16"]
    plan = _plan(path, operation, calibrated=True)
    model = apply_plan(path, plan)
    assert _weight_dtypes(model) == {ir.DataType.FLOAT16}
    _check(path, model, ir.DataType.FLOAT16, operation, plan, monkeypatch)


@pytest.mark.parametrize("operation", OPERATIONS)
def test_bf16_graph_rewritten_keeps_bf16_and_equals_torch_widened(graphs, monkeypatch, operation):
    path = graphs["bf16"]
    plan = _plan(path, operation, calibrated=False)
    model = apply_plan(path, plan)
    assert _weight_dtypes(model) == {ir.DataType.BFLOAT16}
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    _check(path, model, ir.DataType.BFLOAT16, operation, plan, monkeypatch)


def test_bf16_merge_writes_the_float32_average_rounded_once(graphs):
    """The tied weight is bf16(mean of the float32-widened weights), bit for bit."""
    path = graphs["bf16"]
    source = detect_structure(load_model(path)).blocks
    plan = _plan(path, "merge", calibrated=False)
    tied = detect_structure(apply_plan(path, plan)).blocks
    for role in ("gate", "up", "down"):
        stored = [source[b].ff.linears[role].weight.const_value.numpy() for b in (1, 2)]
        mean = np.mean([w.astype(np.float32) for w in stored], axis=0).astype(ml_dtypes.bfloat16)
        written = tied[1].ff.linears[role].weight.const_value.numpy()
        assert written.dtype == ml_dtypes.bfloat16
        assert tied[2].ff.linears[role].weight is tied[1].ff.linears[role].weight
        np.testing.assert_array_equal(written.view(np.uint16), mean.view(np.uint16))


def test_fp16_calibration_aligns_neurons_as_float32_does(graphs):
    """Correlations and the assignment run in float32/float64 on fp16 activations: the
    permutations found on the fp16 graph are the float32 graph's."""
    request = MergeRequest(ranges=[(0, 3)], method="permute", data=RANDOM)
    windows = [plan_merge(graphs[name], request).windows[0] for name in ("fp32", "fp16")]
    for block in (1, 2, 3):
        fp32, fp16 = (np.asarray(w.permutations[block]) for w in windows)
        assert (fp32 == fp16).mean() > 0.95
        correlations = [w.matched_correlation[block] for w in windows]
        assert correlations[1] == pytest.approx(correlations[0], abs=1e-3)
        assert correlations[0] > windows[0].identity_correlation[block] + 0.1


def test_fp16_refit_writes_fp16_down_projection(graphs):
    path = graphs["fp16"]
    request = MergeRequest(ranges=[(1, 2)], method="permute", refit=True, data=RANDOM)
    plan = plan_merge(path, request)
    assert len(plan.refit["trials"]) == 4 and np.isfinite(plan.refit["after"])
    model = apply_plan(path, plan)
    assert _weight_dtypes(model) == {ir.DataType.FLOAT16}
    inputs, _ = family_references.feeds("llama")
    logits = session_for_ir(model, path.parent, provider="cpu").run(None, inputs)[0]
    assert np.isfinite(logits).all()


def test_detection_reads_fp16_weights_through_casts(graphs):
    """Every FF of the float32 graph is found in the graph storing them fp16 behind Casts,
    with the same kind, shapes and parameter count, and its weights read as float32."""
    expected = detect_structure(load_model(graphs["fp32"])).blocks
    found = detect_structure(load_model(graphs["cast"])).blocks
    assert len(found) == len(expected) == tiny_models.LAYERS
    for block, reference in zip(found, expected, strict=True):
        assert block.ff.kind == reference.ff.kind == "swiglu"
        assert block.ff.parameter_count == reference.ff.parameter_count
        for role, linear in block.ff.linears.items():
            assert [n.op_type for n in linear.weight_path] == ["Cast"]
            assert linear.weight.const_value.dtype == ir.DataType.FLOAT16
            assert linear.consumed_dtype() == ir.DataType.FLOAT
            weight = linear.read_weight()
            assert weight.dtype == np.float32
            np.testing.assert_allclose(
                weight, reference.ff.linears[role].read_weight(), rtol=1e-3, atol=1e-4
            )


@pytest.mark.parametrize("operation", ["merge", "prune ff", "fuse"])
def test_weights_behind_casts_rewritten_equal_torch(graphs, monkeypatch, operation):
    path = graphs["cast"]
    plan = _plan(path, operation, calibrated=operation != "merge")
    model = apply_plan(path, plan)
    _check(path, model, ir.DataType.FLOAT, operation, plan, monkeypatch)


def test_pair_statistics_of_fp16_rows_equal_float32_rows():
    """Large fp16 activations: their fp16 cross products would overflow; the statistics
    widen them first and agree with the float32 rows' to float32 precision."""
    rng = np.random.default_rng(0)
    rows = {0: rng.standard_normal((512, 8)) * 300, 1: rng.standard_normal((512, 8)) * 300}
    rows[1][:, :4] += rows[0][:, :4]
    half = {i: x.astype(np.float16) for i, x in rows.items()}
    widened = {i: x.astype(np.float32) for i, x in half.items()}
    expected, actual = (
        PairStatistics({0: 8, 1: 8}, [(0, 1)]),
        PairStatistics({0: 8, 1: 8}, [(0, 1)]),
    )
    expected.update(widened)
    actual.update(half)
    assert np.isfinite(actual.cross[(0, 1)]).all()
    np.testing.assert_allclose(actual.correlation(0, 1), expected.correlation(0, 1), atol=1e-6)
    assert align(actual.correlation(0, 1)).permutation[:4].tolist() == [0, 1, 2, 3]
