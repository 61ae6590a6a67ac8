"""A model's fingerprint: what a plan checks before it rewrites anything.

A plan depends on the model's weights and on which ops read them (a block's FF, its norms,
its attention projections), not on how the rest of the graph is wired: the plain export and
the ``--kv-cache`` export of one model differ in their inputs, outputs, attention plumbing and
every generated name (dynamo numbers its constants per trace), yet a plan made on one must
apply to the other. So the fingerprint hashes the weights in the order the graph first reads
them (which follows the blocks), each by dtype, shape, the op that reads it and a sample of
its values (a few hundred elements: cheap on 2 GB, yet it tells two fine-tunes apart). Shape
and index constants (integer tensors, scalars) are left out: they are the signature's, not
the model's.

Fingerprints carry their scheme (``w2-``); the first scheme (graph topology, node and
initializer names, no values) wrote bare hex digests, and :func:`matches` still checks those
so that committed plans keep applying.
"""

from __future__ import annotations

__all__ = ["fingerprint", "legacy_fingerprint", "matches"]

import hashlib
import os

import numpy as np
import onnx_ir as ir

SCHEME = "w2-"
# Integer and symbolic tensors are shapes, indices and masks of a signature, never weights.
_NOT_WEIGHTS = {
    ir.DataType.INT32,
    ir.DataType.INT64,
    ir.DataType.UINT32,
    ir.DataType.UINT64,
    ir.DataType.BOOL,
    ir.DataType.STRING,
}
_SAMPLE = 256


def _weights_in_use_order(model: ir.Model):
    """(weight, op type of its first reader), in the order the graph first reads them."""
    seen: set[str] = set()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for value in node.inputs:
            if value is None or not value.is_initializer() or value.name in seen:
                continue
            seen.add(value.name)
            if value.dtype in _NOT_WEIGHTS or value.shape is None or len(value.shape) == 0:
                continue
            yield value, node.op_type


def _sample(value: ir.Value) -> bytes:
    """Evenly spaced elements of the weight (all of a small one)."""
    tensor = value.const_value
    if tensor is None:
        return b""
    if isinstance(tensor, ir.ExternalTensor) and tensor.dtype.bitwidth % 8 == 0:
        return _sample_external(tensor)
    flat = np.ascontiguousarray(tensor.numpy()).reshape(-1)
    return np.ascontiguousarray(flat[:: max(1, flat.size // _SAMPLE)]).tobytes()


def _sample_external(tensor: ir.ExternalTensor) -> bytes:
    """:func:`_sample`'s bytes read from the data file element by element, so that a check
    of a large model neither maps nor reads its weights (little-endian, as ONNX stores them)."""
    itemsize = int(tensor.dtype.itemsize)
    step = max(1, tensor.size // _SAMPLE)
    offset = tensor.offset or 0
    with open(tensor.path, "rb") as file:
        if step == 1:
            return os.pread(file.fileno(), tensor.size * itemsize, offset)
        return b"".join(
            os.pread(file.fileno(), itemsize, offset + index * itemsize)
            for index in range(0, tensor.size, step)
        )


def fingerprint(model: ir.Model) -> str:
    """A hash of the weights (dtype, shape, reading op, sampled values) in first-use order."""
    digest = hashlib.sha256()
    for value, op_type in _weights_in_use_order(model):
        shape = tuple(value.shape)
        digest.update(f"{value.dtype}|{shape}|{op_type}|".encode())
        digest.update(_sample(value))
    return SCHEME + digest.hexdigest()[:16]


def legacy_fingerprint(model: ir.Model) -> str:
    """The first scheme: topology and weight names and shapes (plans before ``w2-`` hold it)."""
    digest = hashlib.sha256()
    for node in model.graph:
        digest.update(f"{node.op_type}|{node.name}|".encode())
        digest.update("|".join(v.name if v is not None else "" for v in node.inputs).encode())
        digest.update("|".join(v.name for v in node.outputs).encode())
    for name, value in sorted(model.graph.initializers.items()):
        shape = tuple(value.shape) if value.shape is not None else ()
        digest.update(f"{name}|{value.dtype}|{shape}".encode())
    return digest.hexdigest()[:16]


def matches(model: ir.Model, recorded: str) -> bool:
    """Whether ``recorded`` (of either scheme) is this model's fingerprint."""
    if recorded.startswith(SCHEME):
        return fingerprint(model) == recorded
    return legacy_fingerprint(model) == recorded
