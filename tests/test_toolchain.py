"""Quantization, fp16 and the transformers optimizer keep every tied set one initializer."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

from layerfuse.cli import main
from layerfuse.data.batches import make_batches
from layerfuse.errors import LayerfuseError
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.model.stats import model_stats
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.inputs import parse_shapes
from layerfuse.runtime.session import create_session
from layerfuse.toolchain import ConversionError, convert_fp16, optimize, quantize_model
from layerfuse.toolchain.convert import run_conversion
from tests import graphs

QUANTIZED = {onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4}


@pytest.fixture(scope="module")
def llama_variants(tiny, tmp_path_factory):
    """The tiny Llama, its FFs 1-3 tied (3 FFs -> 1) and its blocks 1-3 fused."""
    root = tmp_path_factory.mktemp("toolchain")
    original = tiny.model("llama")
    plan = plan_merge(original, MergeRequest(ranges=[(1, 3)], method="vanilla"))
    tied = save_model(apply_plan(original, plan), root / "tied" / "model.onnx")
    model = load_model(original)
    blocks = len(detect_structure(model).blocks)
    fuse = FusePlan(fingerprint(model), blocks, drop_attention=[2, 3], fuse=[(1, 3)])
    fused = save_model(apply_plan(original, fuse), root / "fused" / "model.onnx")
    for path in (tied, fused):
        carry_manifest(original, path)
    return {"original": original, "tied": tied, "fused": fused, "root": root}


def _weight_readers(path) -> dict[str, int]:
    """Quantized weight initializers (not scalars) and how many nodes read each."""
    model = onnx.load(path)
    readers = collections.Counter(name for node in model.graph.node for name in node.input)
    return {
        init.name: readers[init.name]
        for init in model.graph.initializer
        if init.data_type in QUANTIZED and np.prod(init.dims) >= 16
    }


def _logits(path, batches) -> np.ndarray:
    session = create_session(path, provider="cpu")
    return np.concatenate([session.run(None, batch.feeds)[0] for batch in batches])


def _relative_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_tie_is_one_initializer_and_costs_what_the_original_loses(llama_variants, scheme):
    root = llama_variants["root"]
    paths = {}
    for name in ("original", "tied"):
        out = root / f"{name}-{scheme}" / "model.onnx"
        assert main(["quantize", str(llama_variants[name]), "-o", str(out), f"--{scheme}"]) == 0
        paths[name] = out
    result = quantize_model(llama_variants["tied"], root / f"again-{scheme}.onnx", scheme)
    assert [check.readers for check in result.ties] == [3, 3, 3]
    assert all(check.kept for check in result.ties)

    original, tied = _weight_readers(paths["original"]), _weight_readers(paths["tied"])
    # 3 FFs became 1: two FFs' three matrices are gone, nothing was copied per consumer.
    assert len(tied) == len(original) - 2 * 3
    tied_sets = {name: count for name, count in tied.items() if count > 1}
    assert len(tied_sets) == 3 and set(tied_sets.values()) == {3}
    # The removed bytes stay removed after quantization: 6 matrices of 32 x 64 at 8 or 4 bits.
    removed = model_stats(paths["original"]).unique_content_bytes - result.unique_bytes
    expected = 6 * 32 * 64 * (1 if scheme == "int8" else 0.5)
    assert expected <= removed <= 1.3 * expected

    batches = make_batches(
        llama_variants["original"], "random", "test", tokens=256, seq_len=16, batch_size=4
    )
    loss = {
        name: _relative_error(_logits(llama_variants[name], batches), _logits(paths[name], batches))
        for name in ("original", "tied")
    }
    assert 0 < loss["tied"] <= 2 * loss["original"] and loss["original"] <= 2 * loss["tied"]


def _tied_stack(tmp_path):
    source = graphs.ff_stack(tmp_path / "src.onnx", [64] * 4, model_dim=32)
    plan = plan_merge(source, MergeRequest(ranges=[(0, 3)], method="vanilla"))
    return save_model(apply_plan(source, plan), tmp_path / "tied" / "model.onnx")


def _per_consumer_copies(offset: float):
    """A converter that gives every reader of a shared weight its own copy (+ i*offset)."""

    def transform(source, scratch) -> onnx.ModelProto:
        model = onnx.load(source)
        inits = {init.name: init for init in model.graph.initializer}
        seen = collections.Counter()
        for node in model.graph.node:
            if node.op_type == "MatMul" and node.input[1] in inits:
                name = node.input[1]
                array = numpy_helper.to_array(inits[name]) + seen[name] * offset
                copy = numpy_helper.from_array(array.astype(np.float32), f"{name}.{seen[name]}")
                model.graph.initializer.append(copy)
                node.input[1] = copy.name
                seen[name] += 1
        return model

    return transform


def test_identical_per_consumer_copies_are_folded_back_into_one(tmp_path):
    tied = _tied_stack(tmp_path)
    result = run_conversion(tied, tmp_path / "out.onnx", "copies", _per_consumer_copies(0.0))
    assert [check.readers for check in result.ties] == [4, 4, 4]
    assert all(check.kept and len(check.reads) == 1 for check in result.ties)
    assert result.unique_bytes == result.source_unique_bytes


def test_a_conversion_that_unties_writes_nothing(tmp_path):
    tied = _tied_stack(tmp_path)
    out = tmp_path / "out.onnx"
    with pytest.raises(ConversionError, match="undid 3 of 3 ties"):
        run_conversion(tied, out, "copies", _per_consumer_copies(1e-3))
    assert not out.exists()


def test_fp16_converts_each_tied_weight_once(llama_variants, tmp_path):
    result = convert_fp16(llama_variants["tied"], tmp_path / "fp16" / "model.onnx")
    assert result.ties and all(check.kept for check in result.ties)
    model = onnx.load(result.path)
    dtypes = {init.name: init.data_type for init in model.graph.initializer}
    assert all(dtypes[check.reads[0]] == onnx.TensorProto.FLOAT16 for check in result.ties)
    assert result.unique_bytes <= 0.51 * result.source_unique_bytes
    inputs = [i.type.tensor_type.elem_type for i in model.graph.input]
    assert inputs == [
        i.type.tensor_type.elem_type for i in onnx.load(llama_variants["tied"]).graph.input
    ]


def test_optimizer_fuses_the_tied_model_like_the_original(llama_variants, tmp_path):
    results = {
        name: optimize(llama_variants[name], tmp_path / name / "model.onnx")
        for name in ("original", "tied", "fused")
    }
    assert results["tied"].details["fused"] == results["original"].details["fused"]
    assert results["original"].details["fused"]["SkipSimplifiedLayerNormalization"] > 0
    assert [c.kept for c in results["tied"].ties] == [True] * 3
    ops = collections.Counter(n.op_type for n in onnx.load(results["fused"].path).graph.node)
    assert ops["FusedSwiGLU"] == 1
    batches = make_batches(
        llama_variants["original"], "random", "test", tokens=64, seq_len=16, batch_size=4
    )
    for name in ("tied", "fused"):
        before, after = _logits(llama_variants[name], batches), _logits(results[name].path, batches)
        assert np.max(np.abs(after - before)) <= 1e-4


def test_quantizing_a_fused_model_quantizes_the_fused_weights(llama_variants, tmp_path):
    # Quantizers do not look inside ONNX functions: the fused FFN is inlined first, so no
    # MatMul is left reading a float weight and the wide fused weights are 4-bit.
    result = quantize_model(llama_variants["fused"], tmp_path / "int4" / "model.onnx", "int4")
    model = onnx.load(result.path)
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert not model.functions
    assert [
        n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in floats
    ] == []
    nbits = [
        {a.name: a.i for a in node.attribute}
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
    ]
    assert {attributes["bits"] for attributes in nbits} == {4}
    # gate and up of the 3 FFs side by side (32 -> 2 x 3 x 64), and their down-projections.
    assert {(32, 2 * 3 * 64), (3 * 64, 32)} <= {(a["K"], a["N"]) for a in nbits}


def test_conversion_errors_are_one_line_and_write_nothing(llama_variants, tmp_path, capsys):
    source = str(llama_variants["tied"])
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"not a model")
    out = tmp_path / "out" / "model.onnx"
    calls = [
        ["quantize", source, "-o", source, "--int8"],
        ["quantize", source, "-o", str(out), "--int4", "--block-size", "24"],
        ["quantize", str(tmp_path / "missing.onnx"), "-o", str(out), "--int8"],
        ["quantize", str(garbage), "-o", str(out), "--int4"],
        ["convert", source, "-o", str(tmp_path / "x.txt"), "--fp16"],
        ["convert", str(garbage), "-o", str(out), "--optimize"],
    ]
    assert [main(args) for args in calls] == [2] * len(calls)
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == len(calls) and all(e.startswith("layerfuse: error:") for e in errors)
    assert not out.parent.exists() and not (tmp_path / "x.txt").exists()


def test_cuda_graphs_need_the_cuda_provider(llama_variants):
    config = BenchConfig(shapes=parse_shapes("1x8"), provider="cpu", cuda_graph=True)
    with pytest.raises(LayerfuseError, match="CUDA graphs need"):
        run_bench([llama_variants["original"]], config)


def _tied_embedding_model(path, vocab: int = 128, hidden: int = 64):
    """ids -> Gather(table) -> MatMul(w) -> MatMul(Transpose(table)) -> logits, as torch
    exports tied word embeddings (SmolLM2): one table, read by a lookup and by the logits."""
    rng = np.random.default_rng(0)
    table = rng.standard_normal((vocab, hidden)).astype(np.float32)
    inner = (rng.standard_normal((hidden, hidden)) / hidden**0.5).astype(np.float32)
    graph = onnx.helper.make_graph(
        [
            onnx.helper.make_node("Gather", ["table", "input_ids"], ["embedding"]),
            onnx.helper.make_node("MatMul", ["embedding", "inner"], ["hidden"]),
            onnx.helper.make_node("Transpose", ["table"], ["table_t"], perm=[1, 0]),
            onnx.helper.make_node("MatMul", ["hidden", "table_t"], ["logits"]),
        ],
        "tied_embeddings",
        [onnx.helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])],
        [onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s", vocab])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(inner, "inner")],
    )
    opsets = [onnx.helper.make_opsetid("", 18)]
    onnx.save(onnx.helper.make_model(graph, opset_imports=opsets, ir_version=10), path)
    return table


def _onnxruntime_int4(table: np.ndarray, block: int = 32) -> np.ndarray:
    """``table`` ([vocab, hidden]) through onnxruntime's int4 block quantizer and back."""
    vocab, hidden = table.shape
    count = hidden // block
    packed = np.zeros((vocab, count, block // 2), np.uint8)
    scales = np.zeros((vocab, count), np.float32)
    zero_points = np.zeros((vocab, (count + 1) // 2), np.uint8)
    weight = np.ascontiguousarray(table.T)
    quantize_matmul_4bits(packed, weight, scales, zero_points, block, vocab, hidden, True)
    q = np.stack([packed & 15, packed >> 4], axis=-1).reshape(vocab, count, block)
    return ((q.astype(np.float32) - 8) * scales[..., None]).reshape(vocab, hidden)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
def test_tied_word_embeddings_are_quantized_once_for_lookup_and_logits(tmp_path, scheme):
    source = tmp_path / "source.onnx"
    table = _tied_embedding_model(source)
    shared = quantize_model(source, tmp_path / "shared" / "model.onnx", scheme)
    plain = quantize_model(source, tmp_path / "plain" / "model.onnx", scheme, embeddings=False)
    assert shared.details["embeddings"] == "table" and not plain.details["embeddings"]
    model = onnx.load(shared.path)
    projection = "MatMulNBits" if scheme == "int4" else "DynamicQuantizeMatMul"
    readers = {n.op_type for n in model.graph.node if f"table_Q{scheme[-1]}" in n.input}
    assert readers == {"Gather", projection}
    assert "table" not in {init.name for init in model.graph.initializer}
    bits = 4 if scheme == "int4" else 8
    assert plain.unique_bytes - shared.unique_bytes >= table.nbytes * (1 - bits / 32) * 0.85

    model.graph.output.append(onnx.helper.make_empty_tensor_value_info("embedding"))
    onnx.save(model, tmp_path / "probe.onnx")
    ids = np.random.default_rng(1).integers(0, len(table), (3, 16))
    session = create_session(tmp_path / "probe.onnx", provider="cpu")
    rows, logits = session.run(["embedding", "logits"], {"input_ids": ids})
    expected = table[ids]
    if scheme == "int4":
        # The lookup reads the blocks onnxruntime's quantizer makes of the head's [hidden,
        # vocab] weight; each element within a step (|block extreme| / 8; half a step unless
        # clipped at +7) of the float table.
        assert np.allclose(rows, _onnxruntime_int4(table)[ids], rtol=0, atol=1e-6)
        blocks = expected.reshape(*ids.shape, -1, 32)
        step = np.repeat(np.abs(blocks).max(axis=-1) / 8, 32, axis=-1)
        assert np.all(np.abs(rows - expected) <= step + 1e-6)
    else:  # every looked-up element within half a quantization step of the float table
        step = np.abs(expected).max(axis=-1, keepdims=True) / 127
        assert np.all(np.abs(rows - expected) <= step / 2 + 1e-6)
    # ... and the logits read the same table: close to the float model's (three 4-bit matrices
    # in series lose about 16%, 8-bit ones 2%; a misread table would be off by ~100%).
    reference = create_session(source, provider="cpu").run(None, {"input_ids": ids})[0]
    assert _relative_error(reference, logits) <= (0.25 if scheme == "int4" else 0.04)
