"""Streamed int4 (``quantize --int4``): the bytes onnxruntime's MatMulNBitsQuantizer writes,
made one weight at a time.

The quantizer itself is the reference: it loads the whole model (5-7x its size at peak), so
layerfuse no longer runs it, but on tiny models its packed blocks and scales must equal the
streamed ones byte for byte, and the two graphs must compute the same logits.
"""

from __future__ import annotations

import collections
import tracemalloc

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper
from onnxruntime.capi._pybind_state import quantize_matmul_4bits

from layerfuse.export.synthetic import SyntheticConfig, write_synthetic_model
from layerfuse.model import io as model_io
from layerfuse.model.io import load_model
from layerfuse.runtime.inputs import parse_shapes, synthetic_feeds
from layerfuse.runtime.session import create_session
from layerfuse.toolchain import quantize_model
from layerfuse.toolchain.convert import load_inlined
from layerfuse.toolchain.int4 import int4_blocks
from layerfuse.toolchain.quiet import quiet_onnxruntime

TINY = {"hidden": 64, "ff": 128, "heads": 4, "kv_heads": 2, "layers": 3, "vocab": 300}


def _onnxruntime_blocks(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """What MatMulNBitsQuantizer does with one [K, N] weight (bf16 goes through float32)."""
    k, n = weight.shape
    count = -(-k // block)
    source = weight.astype(np.float32) if weight.dtype == ml_dtypes.bfloat16 else weight
    padded = np.pad(source, ((0, count * block - k), (0, 0)))
    packed = np.zeros((n, count, block // 2), np.uint8)
    scales = np.zeros((n, count), source.dtype)
    zero_points = np.zeros((n, (count + 1) // 2), np.uint8)
    quantize_matmul_4bits(packed, padded, scales, zero_points, block, n, count * block, True)
    return packed, scales.astype(weight.dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize(("k", "block"), [(256, 32), (96, 16), (80, 32), (384, 128)])
def test_blocks_are_the_quantizers_bytes(dtype, k, block):
    rng = np.random.default_rng(k)
    weight = rng.standard_normal((k, 40)).astype(np.float32)
    weight[:block, 0] = 0  # an all-zero block: scale 0, every element 8
    weight[:, 1] = np.round(weight[:, 1] * 4) / 4  # exact halves once scaled (roundf vs rint)
    weight[3, 2] = -4 * np.abs(weight[:block, 2]).max()  # a negative extreme
    weight = weight.astype(dtype)
    packed, scales = int4_blocks(weight, block)
    expected_packed, expected_scales = _onnxruntime_blocks(weight, block)
    assert packed.shape == expected_packed.shape and scales.dtype == expected_scales.dtype
    assert packed.tobytes() == expected_packed.tobytes()
    assert scales.tobytes() == expected_scales.tobytes()


def test_blocks_are_made_a_slab_at_a_time(monkeypatch):
    # A weight larger than one slab gives the same bytes as converted whole.
    import layerfuse.toolchain.int4 as int4

    weight = np.random.default_rng(0).standard_normal((512, 96)).astype(np.float16)
    whole = int4_blocks(weight, 32)
    monkeypatch.setattr(int4, "_SLAB_ELEMENTS", 32 * 96 * 3)
    slabs = int4_blocks(weight, 32)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(whole, slabs, strict=True))


def _reference(source, block: int, accuracy_level: int | None) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        load_inlined(source),
        bits=4,
        block_size=block,
        is_symmetric=True,
        accuracy_level=accuracy_level,
        op_types_to_quantize=("MatMul",),
    )
    with quiet_onnxruntime():
        quantizer.process()
    return quantizer.model.model


def _quantized(model: onnx.ModelProto) -> dict[str, bytes]:
    return {
        init.name: numpy_helper.to_array(init).tobytes()
        for init in model.graph.initializer
        if init.name.endswith(("_Q4", "_scales"))
    }


def _nbits(model: onnx.ModelProto) -> list[tuple]:
    return sorted(
        (tuple(node.input), tuple(sorted((a.name, a.i) for a in node.attribute)))
        for node in model.graph.node
        if node.op_type == "MatMulNBits"
    )


@pytest.fixture(scope="module")
def sources(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("int4-sources")
    synthetic = {
        dtype: write_synthetic_model(SyntheticConfig(**TINY, dtype=dtype), root / dtype)
        for dtype in ("float16", "float32")
    }
    return {"llama": tiny.model("llama"), **synthetic}


@pytest.mark.parametrize(
    ("name", "block", "accuracy_level"),
    [("llama", 32, None), ("llama", 16, 4), ("float16", 32, None), ("float32", 64, None)],
)
def test_streamed_model_equals_the_quantizers(sources, tmp_path, name, block, accuracy_level):
    source = sources[name]
    reference = _reference(source, block, accuracy_level)
    out = tmp_path / "int4" / "model.onnx"
    result = quantize_model(
        source, out, "int4", block_size=block, accuracy_level=accuracy_level, embeddings=False
    )
    streamed = onnx.load(out)
    assert result.details["matmuls"] == len(_nbits(streamed)) > 0
    assert _nbits(streamed) == _nbits(reference)
    assert _quantized(streamed) == _quantized(reference)
    floats = {init.name for init in streamed.graph.initializer}
    assert not [n for n in streamed.graph.node if n.op_type == "MatMul" and n.input[1] in floats]

    onnx.save(reference, tmp_path / "reference.onnx")
    feeds = synthetic_feeds(source, parse_shapes("2x16")[0])
    expected = create_session(tmp_path / "reference.onnx", provider="cpu").run(None, feeds)[0]
    logits = create_session(out, provider="cpu").run(None, feeds)[0]
    assert logits.dtype == expected.dtype and np.isfinite(logits).all()
    np.testing.assert_allclose(logits, expected, rtol=1e-6, atol=1e-6)


def _watch_mapping(monkeypatch) -> dict:
    """External tensors mapped (ExternalTensor._load), and the most mapped at once."""
    seen = {"loaded": collections.Counter(), "mapped": set(), "most": 0}
    load, release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def watched_load(self):
        seen["loaded"][self.name] += 1
        seen["mapped"].add(self.name)
        seen["most"] = max(seen["most"], len(seen["mapped"]))
        return load(self)

    def watched_release(self):
        seen["mapped"].discard(self.name)
        return release(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", watched_load)
    monkeypatch.setattr(ir.ExternalTensor, "release", watched_release)
    return seen


def test_one_source_weight_is_held_at_a_time(tmp_path, monkeypatch):
    """Every MatMul weight is mapped once and unmapped before the next; everything else is
    copied file to file; numpy's peak stays at a fraction of the model."""
    # Saved with external data as a big model is (small ones are read in to be written inline).
    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 0)
    shapes = {**TINY, "hidden": 256, "ff": 1024, "vocab": 4096, "layers": 16}
    config = SyntheticConfig(**shapes, dtype="float32")
    source = write_synthetic_model(config, tmp_path / "source")
    weights = {
        node.inputs[1].name
        for node in load_model(source).graph
        if node.op_type == "MatMul" and node.inputs[1].is_initializer()
    }
    model_bytes = config.parameters() * 4
    largest = 4096 * 256 * 4
    seen = _watch_mapping(monkeypatch)
    tracemalloc.start()
    try:
        quantize_model(source, tmp_path / "int4" / "model.onnx", "int4")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(seen["loaded"]) == weights and set(seen["loaded"].values()) == {1}
    assert seen["most"] == 1
    # MatMulNBitsQuantizer held the model several times over; this holds one weight's float32
    # temporaries (the LM head, 4 MiB here, is the largest; measured 14 MiB), not the model.
    assert peak < 5 * largest < model_bytes / 3
