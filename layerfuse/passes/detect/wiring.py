"""How a sublayer sits on the residual stream: its norms, its residual Add, its siblings.

One search covers every wiring in use, by dataflow only. The *stream* a sublayer reads is
its pre-norm's input (or, without one, its own input). From the sublayer's output the search
walks downstream (breadth-first, through views) over norm arithmetic, fused norms and Adds of
two computed tensors, and stops at the first Add whose other operand is that stream: the
residual Add. What it passed on the way tells the wiring:

- nothing: a plain residual (``x + f(norm(x))``: Llama, GPT-2, ViT; ``x + f(x)`` then a norm:
  BERT's post-norm, found behind views too, as OPT-350m reshapes before its norm);
- norm ops: an *output norm* normalizes the sublayer's output before the Add (Gemma-2/3's
  sandwich norms ``x + norm_post(f(norm_pre(x)))``; OLMo-2's ``x + norm(f(x))``);
- an Add of two computed tensors: the *branch* Add of a parallel block (GPT-J, GPT-NeoX,
  Phi-2, Falcon: ``x + attn(ln(x)) + ff(ln(x))``), joining this sublayer's output with its
  sibling's; the residual Add after it is then shared by both sublayers.

``norm_position`` summarises it: ``pre``, ``sandwich`` (pre + output norm), ``output``
(output norm only), ``post``, or None when no residual Add was found (``notes`` then says
why). Removing the sublayer is bypassing :attr:`Wiring.removal`: the branch Add in a
parallel block (the sibling stays), else the residual Add (its output norm goes with it).
"""

from __future__ import annotations

__all__ = ["Wiring", "find_wiring"]

from dataclasses import dataclass

import onnx_ir as ir

from layerfuse.model.graph import consumers, is_constant, skip_views_down
from layerfuse.passes.detect.norms import (
    FUSED_NORM_OPS,
    SKIP_NORM_OPS,
    Norm,
    Residual,
    find_norm,
    same_tensor,
)
from layerfuse.passes.detect.result import Match, describe

_WALK_OPS = frozenset(
    {"Mul", "Div", "Sqrt", "Reciprocal", "Pow", "ReduceMean", "Cast", "Sub", "Add"}
    | set(FUSED_NORM_OPS)
)
_MAX_STEPS = 14


@dataclass
class Wiring:
    """Norms and residual Adds around one attention or FF sublayer.

    ``norm`` is the pre-norm (the one the sublayer reads), ``output_norm`` the norm between the
    sublayer and its residual Add, ``post_norm`` the norm after the residual Add (post-norm
    models; its output is the stream the next sublayer reads), ``branch`` the Add that joins
    this sublayer with its sibling in a parallel block. ``notes`` say what was not found, why.
    """

    norm: Norm | None
    norm_position: str | None
    residual: Residual | None
    post_norm: Norm | None = None
    output_norm: Norm | None = None
    branch: Residual | None = None
    notes: tuple[str, ...] = ()

    @property
    def parallel(self) -> bool:
        return self.branch is not None

    @property
    def stream_out(self) -> ir.Value | None:
        """The residual stream after this sublayer (after its post-norm, if any)."""
        if self.post_norm is not None:
            return self.post_norm.output
        return None if self.residual is None else self.residual.output

    @property
    def removal(self) -> Residual | None:
        """The Add to bypass (output -> operand) to remove this sublayer alone."""
        return self.branch or self.residual

    def to_json(self) -> dict:
        def optional(item) -> dict | None:
            return None if item is None else item.to_json()

        return {
            "norm": optional(self.norm),
            "norm_position": self.norm_position,
            "residual": optional(self.residual),
            "post_norm": optional(self.post_norm),
            "output_norm": optional(self.output_norm),
            "parallel": self.parallel,
            "branch": optional(self.branch),
        }


@dataclass(frozen=True)
class _Found:
    """What the walk found: the residual, the value it came in by, and any branch Add."""

    residual: Residual
    arrived: ir.Value
    branch: Residual | None


def _computed_add(node: ir.Node) -> bool:
    return (
        node.op_type == "Add"
        and len(node.inputs) == 2
        and not any(v is None or is_constant(v) for v in node.inputs)
    )


def _other(node: ir.Node, value: ir.Value) -> ir.Value:
    return node.inputs[1] if node.inputs[0] is value else node.inputs[0]


def _residual_at(node: ir.Node, value: ir.Value, streams: list[ir.Value]) -> Residual | None:
    """``node`` as the residual Add putting ``value`` onto one of ``streams``, if it is one."""
    if node.op_type in SKIP_NORM_OPS and len(node.inputs) >= 2 and value in node.inputs[:2]:
        other = _other(node, value)
        if any(same_tensor(other, s) for s in streams):
            out = node.outputs[3] if len(node.outputs) > 3 else node.outputs[0]
            return Residual(node, other, out)
    if _computed_add(node):
        other = _other(node, value)
        if any(same_tensor(other, s) for s in streams):
            return Residual(node, other, node.outputs[0])
    return None


def _walk(output: ir.Value, streams: list[ir.Value]) -> Match[_Found]:
    """Breadth-first from ``output`` to the Add that puts it onto one of ``streams``."""
    frontier: list[tuple[ir.Value, Residual | None]] = [(output, None)]
    seen: set[ir.Node] = set()
    stops: list[ir.Node] = []
    for _ in range(_MAX_STEPS):
        following = []
        for value, branch in frontier:
            for view in skip_views_down(value):
                for node in consumers(view):
                    residual = _residual_at(node, view, streams)
                    if residual is not None:
                        return Match.ok(_Found(residual, view, branch))
                    if node in seen:
                        continue
                    seen.add(node)
                    if node.op_type not in _WALK_OPS:
                        stops.append(node)
                        continue
                    if branch is None and _computed_add(node):
                        joined = Residual(node, _other(node, view), node.outputs[0])
                        following.append((node.outputs[0], joined))
                    else:
                        following.append((node.outputs[0], branch))
        if not following:
            break
        frontier = following
    names = ", ".join(f"'{s.name}'" for s in streams)
    where = ", ".join(describe(n) for n in dict.fromkeys(stops)) or "nothing"
    return Match.fail(
        f"no Add puts '{output.name}' back onto the stream it reads ({names}) within "
        f"{_MAX_STEPS} steps of norm arithmetic; the search stopped at {where}"
    )


def _post_norm(residual: Residual, width: int, order: dict[ir.Node, int]) -> Norm | None:
    """The norm reading the residual Add's output, seen through views (post-norm models)."""
    if residual.node.op_type in SKIP_NORM_OPS:
        return find_norm(residual.node.outputs[0], width, order)
    for view in skip_views_down(residual.output):
        for node in consumers(view):
            norm = find_norm(node.outputs[0], width, order) if node.outputs else None
            if norm is not None and same_tensor(norm.input, residual.output):
                return norm
    return None


def _output_norm(found: _Found, output: ir.Value, width: int, order) -> Norm | None:
    """The norm between the sublayer's output and the Add it arrived at, if any."""
    if found.arrived is output:
        return None
    norm = find_norm(found.arrived, width, order)
    return norm if norm is not None and same_tensor(norm.input, output) else None


def _norm_note(sublayer_input: ir.Value | None) -> str:
    if sublayer_input is None:
        return "no pre-norm: the sublayer's input is unknown"
    producer = sublayer_input.producer()
    return f"no pre-norm: its input '{sublayer_input.name}' comes from {describe(producer)}"


def find_wiring(
    sublayer_input: ir.Value | None, output: ir.Value, width: int, order: dict[ir.Node, int]
) -> Wiring:
    """The wiring of the sublayer reading ``sublayer_input`` and producing ``output``."""
    pre = None if sublayer_input is None else find_norm(sublayer_input, width, order)
    streams = [s for s in (pre.input if pre else None, sublayer_input) if s is not None]
    notes = () if pre is not None else (_norm_note(sublayer_input),)
    found = _walk(output, streams)
    if not found:
        return Wiring(pre, None, None, notes=(*notes, f"no residual: {found.reason}"))
    residual, branch = found.value.residual, found.value.branch
    output_norm = _output_norm(found.value, output, width, order)
    if pre is not None and same_tensor(residual.operand, pre.input):
        position = "sandwich" if output_norm is not None else "pre"
        return Wiring(pre, position, residual, None, output_norm, branch, notes)
    if pre is not None:
        notes = (
            f"the norm before it ({describe(pre.nodes[0])}) follows the previous "
            "residual Add: post-norm",
        )
    if output_norm is not None:
        return Wiring(None, "output", residual, None, output_norm, branch, notes)
    post = _post_norm(residual, width, order)
    if post is None:
        notes = (*notes, "no norm before or after it")
    return Wiring(None, "post" if post is not None else None, residual, post, None, branch, notes)
