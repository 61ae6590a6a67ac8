"""fp16 and bf16 graphs through merge, prune and fuse, against torch's same surgery.

fp16: the tiny llama from layerfuse's converter (fp16 inside, float32 logits) and from the
onnxruntime-genai builder's ``-p fp16`` (fp16 logits, fused norms, GroupQueryAttention), planned
with calibration and rewritten, must equal torch's surgery (in float32) within fp16's tolerance.

bf16: onnxruntime's CPU provider has no bf16 MatMul, Add, Mul, Pow, Sqrt, Sigmoid or
ReduceMean (1.32): a bf16 llama cannot run here. The rewritten bf16 graph keeps bf16 weights,
passes onnx's full check, and widened to float32 (exact for bf16 values) equals torch with
bf16-rounded weights within bf16's rounding of the weights a rewrite writes.

fp16 weights behind a Cast to float32 (mixed-precision exports) are detected and rewritten.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from layerfuse.export.genai_builder import build_genai_folder
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.merge.correlation import PairStatistics, align
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.runtime.calibration import adapt_feeds
from layerfuse.runtime.session import session_for_ir
from layerfuse.toolchain.fp16 import convert_fp16
from tests import family_references, tiny_models

RANDOM = DataSettings(data="random", calib_tokens=64, valid_tokens=64, seq_len=16, batch_size=4)
FUSE = {"drop": [1, 2], "runs": [(1, 2)]}
# Graph -> the precision its weights were stored in (the torch reference rounds to it).
ROUNDING = {"bf16": torch.bfloat16, "cast": torch.float16}
OPERATIONS = ("merge", "prune block", "prune ff", "prune attention", "fuse")
# Relative to the largest |logit|: fp16 graphs compute in fp16; the widened bf16 and the Cast
# graphs in float32, off torch only by the rounding of the weights a rewrite writes.
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


def to_bf16(model: ir.Model) -> None:
    """A float32 graph made bf16, but for Sin and Cos (the rotary tables, which ONNX's opset
    18 has no bf16 schema for): those run in float32 between Casts, as in torch's exports."""
    dtype = ir.DataType.BFLOAT16
    retype(model, ir.DataType.FLOAT, dtype)
    for node in list(model.graph):
        if node.op_type not in ("Sin", "Cos"):
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
    in float32: valid ONNX by the full checker), fp16 weights behind Casts, and the
    onnxruntime-genai builder's ``-p fp16`` graph (fused residual norms, a KV cache)."""
    root = tmp_path_factory.mktemp("dtypes")
    fp32 = tiny.model("llama")
    fp16 = convert_fp16(fp32, root / "fp16" / "model.onnx").path
    bf16 = _variant(fp32, root / "bf16" / "model.onnx", to_bf16)
    cast = _variant(fp32, root / "cast" / "model.onnx", weights_behind_casts)
    genai = build_genai_folder(tiny.folder("llama"), root / "genai", precision="fp16")
    return {"fp32": fp32, "fp16": fp16, "bf16": bf16, "cast": cast, "genai": genai}


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
    tensors = [value.const_value for value in model.graph.initializers.values()]
    return {t.dtype for t in tensors if t is not None and len(t.shape) == 2}


def _check(path: Path, model: ir.Model, dtype: ir.DataType, operation: str, plan, monkeypatch):
    """onnxruntime's output of ``model`` equals torch's same surgery within ``dtype``'s
    tolerance, and the surgery moves the output by more than that (the check can fail)."""
    if dtype == ir.DataType.BFLOAT16:
        retype(model, ir.DataType.BFLOAT16, ir.DataType.FLOAT)
    how, permutations = _surgery(operation, plan)
    rounding = ROUNDING.get(path.parent.name, torch.float32)
    monkeypatch.setattr(tiny_models, "make_model", _reference_model(rounding, permutations))
    inputs, mask = family_references.feeds("llama")
    session = session_for_ir(model, path.parent, provider="cpu")
    actual = session.run(None, adapt_feeds(session, inputs))[0]
    expected = family_references.run("llama", inputs, **how)
    original = family_references.run("llama", inputs, "none")
    bound = TOLERANCE[dtype] * float(np.abs(expected[mask]).max())
    assert float(np.abs(actual.astype(np.float64) - expected)[mask].max()) < bound
    assert float(np.abs(original - expected)[mask].max()) > bound


@pytest.mark.parametrize("operation", OPERATIONS)
@pytest.mark.parametrize("graph", ["fp16", "genai"])
def test_fp16_graph_planned_and_rewritten_equals_torch(graphs, monkeypatch, graph, operation):
    path = graphs[graph]
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
    logits = session_for_ir(model, path.parent).run(None, family_references.feeds("llama")[0])
    assert np.isfinite(logits[0]).all()


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
            weight, expected_weight = linear.read_weight(), reference.ff.linears[role].read_weight()
            dtypes = (linear.weight.const_value.dtype, linear.consumed_dtype(), weight.dtype)
            assert dtypes == (ir.DataType.FLOAT16, ir.DataType.FLOAT, np.float32)
            np.testing.assert_allclose(weight, expected_weight, rtol=1e-3, atol=1e-4)


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
    expected, actual = (PairStatistics({0: 8, 1: 8}, [(0, 1)]) for _ in range(2))
    expected.update(widened)
    actual.update(half)
    assert np.isfinite(actual.cross[(0, 1)]).all()
    np.testing.assert_allclose(actual.correlation(0, 1), expected.correlation(0, 1), atol=1e-6)
    assert align(actual.correlation(0, 1)).permutation[:4].tolist() == [0, 1, 2, 3]
