"""Large synthetic decoders for memory and scale tests, built directly as ONNX.

A Llama-shaped causal LM (decomposed RMSNorm computed in float32, grouped-query attention with
rotary embeddings and a causal plus padding mask, SwiGLU FF, residual Adds, tied or untied LM
head, float32 logits) with random weights of real shapes: e.g. Llama-3-8B's blocks (hidden
4096, FF 14336, 32 query and 8 key/value heads, vocabulary 128256) with as many layers as a
target size needs (:func:`layers_for_bytes`). Weights are lazy: each is generated when the
writer reaches it and freed after, so an 8 GB model is written with about one weight (the
largest, the embedding) in memory. The model always has external data, and a manifest whose
calibration data is ``random`` (there is no tokenizer).
"""

from __future__ import annotations

__all__ = ["SyntheticConfig", "layers_for_bytes", "write_synthetic_model"]

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import onnx_ir as ir

from layerfuse.files import staging_dir
from layerfuse.model.manifest import Manifest
from layerfuse.model.publish import publish_model

OPSET = 18
_CHUNK = 1 << 24  # elements generated at once
_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16}


@dataclass(frozen=True)
class SyntheticConfig:
    hidden: int = 4096
    ff: int = 14336
    heads: int = 32
    kv_heads: int = 8
    layers: int = 2
    vocab: int = 128256
    dtype: str = "float16"
    tied: bool = False
    rope_theta: float = 500000.0
    seed: int = 0
    # Weights are zeros left as holes in the data file: a model of many GB in no time and no
    # disk, for tests of size limits (it computes nothing useful).
    sparse: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def block_parameters(self) -> int:
        attention = 2 * self.hidden * self.heads * self.head_dim
        attention += 2 * self.hidden * self.kv_heads * self.head_dim
        return attention + 3 * self.hidden * self.ff + 2 * self.hidden

    def parameters(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.block_parameters() + self.hidden


def layers_for_bytes(config: SyntheticConfig, target_bytes: int) -> int:
    """The fewest layers that make a model of ``config``'s shapes weigh ``target_bytes``."""
    itemsize = config.numpy_dtype.itemsize
    fixed = replace(config, layers=0).parameters() * itemsize
    return max(1, math.ceil((target_bytes - fixed) / (config.block_parameters() * itemsize)))


class _HoleTensor(ir.LazyTensor):
    """Zeros that the writer leaves as a hole in the data file (reads back as zeros)."""

    def tofile(self, file) -> None:
        file.seek(file.tell() + self.nbytes)
        file.truncate()


class _Builder:
    """Appends nodes and lazily generated weights to one graph."""

    def __init__(self, config: SyntheticConfig) -> None:
        self.config = config
        self.dtype = _DTYPES[config.dtype]
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes) -> ir.Value:
        attributes = {k: int(v) if isinstance(v, ir.DataType) else v for k, v in attributes.items()}
        node = ir.node(op_type, list(inputs), attributes=attributes)
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array, name: str | None = None) -> ir.Value:
        """A small constant initializer (shapes, scalars)."""
        name = name or f"const_{len(self.initializers)}"
        value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
        self.initializers.append(value)
        return value

    def weight(self, name: str, shape: tuple[int, ...], std: float | None) -> ir.Value:
        """A random N(0, std) weight (ones when ``std`` is None), generated when written."""
        index, numpy_dtype, seed = len(self.initializers), self.config.numpy_dtype, self.config.seed

        def generate() -> ir.Tensor:
            size = math.prod(shape)
            if std is None:
                return ir.tensor(np.ones(shape, numpy_dtype), name=name)
            if self.config.sparse:
                return ir.tensor(np.zeros(shape, numpy_dtype), name=name)
            rng = np.random.default_rng([seed, index])
            data = np.empty(size, numpy_dtype)
            for start in range(0, size, _CHUNK):
                stop = min(size, start + _CHUNK)
                chunk = rng.standard_normal(stop - start, dtype=np.float32)
                data[start:stop] = chunk * np.float32(std)
            return ir.tensor(data.reshape(shape), name=name)

        kind = _HoleTensor if self.config.sparse and std is not None else ir.LazyTensor
        tensor = kind(generate, dtype=self.dtype, shape=ir.Shape(shape), name=name)
        value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(self.dtype))
        value.const_value = tensor
        self.initializers.append(value)
        return value

    def linear(self, x: ir.Value, name: str, fan_in: int, fan_out: int) -> ir.Value:
        return self.op("MatMul", x, self.weight(name, (fan_in, fan_out), fan_in**-0.5))

    def rms_norm(self, x: ir.Value, name: str) -> ir.Value:
        """Decomposed RMSNorm in float32, as torch exports it."""
        wide = x if self.dtype == ir.DataType.FLOAT else self.op("Cast", x, to=ir.DataType.FLOAT)
        square = self.op("Pow", wide, self.const(np.float32(2.0)))
        mean = self.op("ReduceMean", square, self.const(np.array([-1], np.int64)), keepdims=1)
        root = self.op("Sqrt", self.op("Add", mean, self.const(np.float32(1e-5))))
        normed = self.op("Mul", wide, self.op("Reciprocal", root))
        if self.dtype != ir.DataType.FLOAT:
            normed = self.op("Cast", normed, to=self.dtype)
        return self.op("Mul", self.weight(name, (self.config.hidden,), None), normed)


def _positions(b: _Builder, input_ids: ir.Value, attention_mask: ir.Value):
    """(cos, sin) of the rotary embedding [S, head_dim] and the additive mask [B, 1, S, S]."""
    c = b.config
    length = b.op("Squeeze", b.op("Shape", input_ids, start=1, end=2))
    steps = b.op("Range", b.const(np.int64(0)), length, b.const(np.int64(1)))
    inv_freq = c.rope_theta ** -(np.arange(0, c.head_dim, 2, dtype=np.float32) / c.head_dim)
    positions = b.op("Unsqueeze", b.op("Cast", steps, to=ir.DataType.FLOAT), b.const([1]))
    freqs = b.op("Mul", positions, b.const(inv_freq.astype(np.float32)[None, :]))
    angles = b.op("Concat", freqs, freqs, axis=-1)
    cos, sin = (b.op("Cast", b.op(op, angles), to=b.dtype) for op in ("Cos", "Sin"))
    rows = b.op("Unsqueeze", steps, b.const([1]))
    columns = b.op("Unsqueeze", steps, b.const([0]))
    causal = b.op("LessOrEqual", columns, rows)
    padding = b.op("Cast", attention_mask, to=ir.DataType.BOOL)
    allowed = b.op("And", causal, b.op("Unsqueeze", padding, b.const([1, 2])))
    blocked = -1e4 if b.dtype == ir.DataType.FLOAT16 else -1e9
    zero, low = (b.const(np.array(v, b.config.numpy_dtype)) for v in (0.0, blocked))
    return cos, sin, b.op("Where", allowed, zero, low)


def _rotate(b: _Builder, x: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
    half = b.config.head_dim // 2
    axis = b.const([3])
    first = b.op("Slice", x, b.const([0]), b.const([half]), axis)
    second = b.op("Slice", x, b.const([half]), b.const([2 * half]), axis)
    rotated = b.op("Concat", b.op("Neg", second), first, axis=-1)
    return b.op("Add", b.op("Mul", x, cos), b.op("Mul", rotated, sin))


def _heads(b: _Builder, x: ir.Value, count: int) -> ir.Value:
    """[B, S, count * head_dim] -> [B, count, S, head_dim]."""
    split = b.op("Reshape", x, b.const([0, 0, count, b.config.head_dim]))
    return b.op("Transpose", split, perm=[0, 2, 1, 3])


def _attention(b: _Builder, x: ir.Value, prefix: str, positions) -> ir.Value:
    c = b.config
    cos, sin, mask = positions
    q = _heads(b, b.linear(x, f"{prefix}.q_proj.weight", c.hidden, c.heads * c.head_dim), c.heads)
    kv_width = c.kv_heads * c.head_dim
    k = _heads(b, b.linear(x, f"{prefix}.k_proj.weight", c.hidden, kv_width), c.kv_heads)
    v = _heads(b, b.linear(x, f"{prefix}.v_proj.weight", c.hidden, kv_width), c.kv_heads)
    q, k = _rotate(b, q, cos, sin), _rotate(b, k, cos, sin)
    if c.kv_heads != c.heads:
        repeat = b.const([1, 1, c.heads // c.kv_heads, 1, 1])
        shape = b.const([0, c.heads, -1, c.head_dim])
        k, v = (
            b.op("Reshape", b.op("Expand", b.op("Unsqueeze", t, b.const([2])), repeat), shape)
            for t in (k, v)
        )
    scores = b.op("MatMul", q, b.op("Transpose", k, perm=[0, 1, 3, 2]))
    scale = b.const(np.array(c.head_dim**-0.5, c.numpy_dtype))
    probs = b.op("Softmax", b.op("Add", b.op("Mul", scores, scale), mask), axis=-1)
    merged = b.op("Transpose", b.op("MatMul", probs, v), perm=[0, 2, 1, 3])
    flat = b.op("Reshape", merged, b.const([0, 0, c.heads * c.head_dim]))
    return b.linear(flat, f"{prefix}.o_proj.weight", c.heads * c.head_dim, c.hidden)


def _feedforward(b: _Builder, x: ir.Value, prefix: str) -> ir.Value:
    c = b.config
    gate = b.linear(x, f"{prefix}.gate_proj.weight", c.hidden, c.ff)
    up = b.linear(x, f"{prefix}.up_proj.weight", c.hidden, c.ff)
    hidden = b.op("Mul", b.op("Mul", gate, b.op("Sigmoid", gate)), up)
    return b.linear(hidden, f"{prefix}.down_proj.weight", c.ff, c.hidden)


def build_synthetic(config: SyntheticConfig) -> ir.Model:
    """The decoder as an onnx_ir model whose weights are generated only when written."""
    b = _Builder(config)
    input_ids = ir.Value(name="input_ids", shape=ir.Shape(["batch", "sequence"]))
    attention_mask = ir.Value(name="attention_mask", shape=ir.Shape(["batch", "sequence"]))
    for value in (input_ids, attention_mask):
        value.type = ir.TensorType(ir.DataType.INT64)
    embedding = b.weight("model.embed_tokens.weight", (config.vocab, config.hidden), 1.0)
    x = b.op("Gather", embedding, input_ids, axis=0)
    positions = _positions(b, input_ids, attention_mask)
    for layer in range(config.layers):
        prefix = f"model.layers.{layer}"
        normed = b.rms_norm(x, f"{prefix}.input_layernorm.weight")
        x = b.op("Add", x, _attention(b, normed, f"{prefix}.self_attn", positions))
        normed = b.rms_norm(x, f"{prefix}.post_attention_layernorm.weight")
        x = b.op("Add", x, _feedforward(b, normed, f"{prefix}.mlp"))
    normed = b.rms_norm(x, "model.norm.weight")
    if config.tied:
        head = b.op("Transpose", embedding, perm=[1, 0])
    else:
        head = b.weight("lm_head.weight", (config.hidden, config.vocab), config.hidden**-0.5)
    logits = b.op("MatMul", normed, head)
    if b.dtype != ir.DataType.FLOAT:
        logits = b.op("Cast", logits, to=ir.DataType.FLOAT)
    logits.name = "logits"
    logits.type = ir.TensorType(ir.DataType.FLOAT)
    logits.shape = ir.Shape(["batch", "sequence", config.vocab])
    graph = ir.Graph(
        [input_ids, attention_mask],
        [logits],
        nodes=b.nodes,
        initializers=b.initializers,
        opset_imports={"": OPSET},
        name="synthetic_llama",
    )
    return ir.Model(graph, ir_version=10, producer_name="layerfuse.synthetic")


def synthetic_manifest(config: SyntheticConfig) -> Manifest:
    origin = (
        f"layerfuse synthetic Llama-shaped decoder, random weights ({config.dtype}, "
        f"{config.layers} layers, {config.parameters():,} parameters)"
    )
    summary = {
        "num_layers": config.layers,
        "hidden_size": config.hidden,
        "intermediate_size": config.ff,
        "num_attention_heads": config.heads,
        "num_key_value_heads": config.kv_heads,
        "vocab_size": config.vocab,
        "synthetic": asdict(config),
    }
    return Manifest(
        source="synthetic",
        origin=origin,
        task="causal-lm",
        model_type="llama",
        inputs=["input_ids", "attention_mask"],
        output="logits",
        exporter="layerfuse-synthetic",
        opset=OPSET,
        config=summary,
        bos=False,
    )


def write_synthetic_model(config: SyntheticConfig, folder: str | os.PathLike) -> Path:
    """Write ``folder/model.onnx`` (+ ``model.onnx.data``) and its manifest; return the graph.

    Weights are generated and written one at a time; the graph file is published atomically
    like every other model layerfuse writes.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    with staging_dir(folder) as tmp:
        staged = tmp / target.name
        ir.save(build_synthetic(config), staged, external_data=target.name + ".data")
        publish_model(staged, target)
    synthetic_manifest(config).write(folder)
    return target
