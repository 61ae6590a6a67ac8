"""A model's structural fingerprint: what a plan checks before it rewrites anything.

The hash covers the graph's topology (op types, node names, the names they read and write)
and every initializer's name, dtype and shape, but not weight bytes: computing it on a 2 GB
model reads no weights. Two graphs with the same fingerprint are the same rewrite target.
"""

from __future__ import annotations

__all__ = ["fingerprint"]

import hashlib

import onnx_ir as ir


def fingerprint(model: ir.Model) -> str:
    """A hash of the graph's topology and weight shapes (not weight bytes: cheap on 2 GB)."""
    digest = hashlib.sha256()
    for node in model.graph:
        digest.update(f"{node.op_type}|{node.name}|".encode())
        digest.update("|".join(v.name if v is not None else "" for v in node.inputs).encode())
        digest.update("|".join(v.name for v in node.outputs).encode())
    for name, value in sorted(model.graph.initializers.items()):
        shape = tuple(value.shape) if value.shape is not None else ()
        digest.update(f"{name}|{value.dtype}|{shape}".encode())
    return digest.hexdigest()[:16]
