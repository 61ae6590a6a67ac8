"""Parameters are the weights a model stands for, not the elements its format stores: a
quantized variant reports its float model's count, scales and zero points apart."""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerfuse.model.io import load_model, parameter_count
from layerfuse.model.stats import model_stats
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.inputs import parse_shapes
from layerfuse.toolchain import quantize_model


def test_quantized_variants_report_the_float_models_parameters(tiny, tmp_path):
    source = tiny.model("llama")
    paths = {"float": source}
    for scheme in ("int4", "int8"):
        paths[scheme] = quantize_model(source, tmp_path / scheme / "model.onnx", scheme).path
    stats = {name: model_stats(path) for name, path in paths.items()}
    assert {name: s.parameters for name, s in stats.items()} == dict.fromkeys(
        paths, stats["float"].parameters
    )
    # Stored elements are what the old count reported: 4-bit pairs packed in one uint8.
    assert parameter_count(load_model(paths["int4"])) < 0.7 * stats["float"].parameters
    # int4: one float scale per block of 32 along K (symmetric, no zero points).
    nbits = [
        {a.name: a.i for a in node.attribute}
        for node in onnx.load(paths["int4"]).graph.node
        if node.op_type == "MatMulNBits"
    ]
    scales = sum(a["N"] * math.ceil(a["K"] / 32) for a in nbits)
    assert stats["int4"].quantization_parameters == scales > 0
    # int8: one scale per weight matrix and the zero points they share.
    assert len(nbits) <= stats["int8"].quantization_parameters <= 2 * len(nbits)
    assert stats["float"].quantization_parameters == 0

    config = BenchConfig(shapes=parse_shapes("1x8"), warmup=0, runs=1, memory=False)
    document = run_bench(list(paths.values()), config, names=list(paths))
    assert [g["ratios"]["parameters"] for g in document["graphs"]] == [1.0, 1.0, 1.0]
    assert [g["stats"]["quantization_parameters"] for g in document["graphs"]] == [
        0,
        scales,
        stats["int8"].quantization_parameters,
    ]


def test_packed_weights_count_as_the_matrices_they_encode(tmp_path):
    """MatMulNBits and GatherBlockQuantized (as onnxruntime-genai writes embeddings)."""
    n, k, vocab, block = 48, 64, 10, 32
    rng = np.random.default_rng(0)
    initializers = {
        "w_q4": rng.integers(0, 255, (n, k // block, block // 2), dtype=np.uint8),
        "w_scales": np.ones(n * k // block, np.float32),
        "w_zero_points": np.full(n * math.ceil(k // block / 2), 0x88, np.uint8),
        "table_q4": rng.integers(0, 255, (vocab, k // 2), dtype=np.uint8),
        "table_scales": np.ones((vocab, k // block), np.float32),
        "norm": np.ones(k, np.float32),
    }
    nodes = [
        helper.make_node(
            "GatherBlockQuantized",
            ["table_q4", "ids", "table_scales"],
            ["embedded"],
            domain="com.microsoft",
            bits=4,
            block_size=block,
            quantize_axis=1,
        ),
        helper.make_node("Mul", ["embedded", "norm"], ["normed"]),
        helper.make_node(
            "MatMulNBits",
            ["normed", "w_q4", "w_scales", "w_zero_points"],
            ["y"],
            domain="com.microsoft",
            K=k,
            N=n,
            bits=4,
            block_size=block,
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "packed",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", n])],
        [numpy_helper.from_array(array, name) for name, array in initializers.items()],
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    path = tmp_path / "packed.onnx"
    onnx.save(helper.make_model(graph, opset_imports=opsets, ir_version=10), path)
    stats = model_stats(path)
    assert stats.parameters == n * k + vocab * k + k
    assert stats.quantization_parameters == n * k // block + n + vocab * k // block
