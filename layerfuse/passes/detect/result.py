"""Match results that say why a pattern did not match, like onnxscript's ``MatchResult``.

A detector that only returns ``None`` leaves a user with "no feed-forward sublayer found" and
nothing to act on. Detectors here return a :class:`Match`: either the thing found, or the
reason it was not, with the node the reason refers to. ``depth`` ranks failures by how far the
matcher got (a MatMul whose input is a Softmax product failed at once; one with an activation
behind it that is read from outside the FF nearly matched), so errors quote the most telling.
"""

from __future__ import annotations

__all__ = ["Match", "Rejection", "describe"]

from dataclasses import dataclass
from typing import Generic, TypeVar

import onnx_ir as ir

T = TypeVar("T")


@dataclass(frozen=True)
class Rejection:
    """Why a candidate (a linear layer, a Softmax) was not taken for a sublayer."""

    what: str
    node: str
    reason: str
    depth: int = 0

    def __str__(self) -> str:
        return f"{self.node}: {self.reason}"

    def to_json(self) -> dict:
        return {"what": self.what, "node": self.node, "reason": self.reason, "depth": self.depth}


@dataclass(frozen=True)
class Match(Generic[T]):
    """A detector's answer: ``value`` when it matched, else ``reason`` (about ``node``)."""

    value: T | None = None
    reason: str = ""
    node: ir.Node | None = None
    depth: int = 0

    def __bool__(self) -> bool:
        return self.value is not None

    @classmethod
    def ok(cls, value: T) -> Match[T]:
        return cls(value=value)

    @classmethod
    def fail(cls, reason: str, node: ir.Node | None = None, depth: int = 0) -> Match[T]:
        return cls(reason=reason, node=node, depth=depth)

    def rejection(self, what: str, candidate: ir.Node) -> Rejection:
        """This failure as a :class:`Rejection` of ``candidate``."""
        return Rejection(what, describe(candidate), self.reason, self.depth)


def describe(node: ir.Node | None) -> str:
    """``OpType 'name'``: how messages refer to a node."""
    if node is None:
        return "graph input"
    return f"{node.op_type} '{node.name}'"
