"""Why each sublayer, norm and residual was or was not recognised: ``inspect --explain``.

Detection keeps its reasons (:class:`~layerfuse.passes.detect.result.Rejection` for every
candidate turned down, ``notes`` on wirings and blocks); this module words them per block as
rows ``(block, part, found, why)``, the same for the terminal table and for JSON.
"""

from __future__ import annotations

__all__ = ["Explanation", "explain_blocks", "explain_rejections"]

from dataclasses import dataclass

from layerfuse.passes.detect.attention import Attention
from layerfuse.passes.detect.feedforward import FeedForward
from layerfuse.passes.detect.norms import Norm
from layerfuse.passes.detect.relaxed import RelaxedLinear
from layerfuse.passes.detect.result import Rejection, describe
from layerfuse.passes.detect.structure import Block
from layerfuse.passes.detect.wiring import Wiring
from layerfuse.passes.linears import Linear


@dataclass(frozen=True)
class Explanation:
    """One row: in ``block`` (None: not in any block), ``part`` was ``found`` or not, ``why``."""

    block: int | None
    part: str
    found: bool
    why: str

    def to_json(self) -> dict:
        return {"block": self.block, "part": self.part, "found": self.found, "why": self.why}


def _linear(linear: Linear) -> str:
    relaxed = ""
    if isinstance(linear, RelaxedLinear):
        relaxed = f" plus its own rank-{linear.relax_rank} delta"
    if linear.columns is None:
        return describe(linear.node) + relaxed
    start, stop = linear.columns
    return f"columns {start}-{stop} of the fused projection {describe(linear.node)}{relaxed}"


def _feedforward(ff: FeedForward) -> str:
    inputs = f"gate {_linear(ff.gate)} and up {_linear(ff.up)}" if ff.gated else _linear(ff.up)
    return (
        f"{ff.kind}: down-projection {_linear(ff.down)} reads {inputs} through "
        f"{len(ff.region)} elementwise ops with a {ff.activation} activation; "
        f"{ff.model_dim} -> {ff.width} -> {ff.model_dim}"
    )


def _attention(attention: Attention) -> str:
    reads = "" if attention.input is None else f" reading '{attention.input.name}'"
    return (
        f"{describe(attention.core)} with {len(attention.projections)} input projections"
        f"{reads}, output projection {describe(attention.output_projection.node)}"
    )


def _norm(norm: Norm, where: str) -> str:
    how = "fused" if norm.fused else f"decomposed into {len(norm.nodes)} ops"
    return f"{norm.kind} norm {where} ({how}, from {describe(norm.nodes[0])})"


def _norm_row(wiring: Wiring) -> tuple[bool, str]:
    parts = []
    if wiring.norm is not None:
        parts.append(_norm(wiring.norm, f"before it, on the stream '{wiring.norm.input.name}'"))
    if wiring.output_norm is not None:
        parts.append(_norm(wiring.output_norm, "on its output, before the residual Add"))
    if wiring.post_norm is not None:
        parts.append(_norm(wiring.post_norm, "after the residual Add (post-norm)"))
    parts += [note for note in wiring.notes if not note.startswith("no residual")]
    return bool(wiring.norm or wiring.output_norm or wiring.post_norm), "; ".join(parts)


def _residual_row(wiring: Wiring) -> tuple[bool, str]:
    residual = wiring.residual
    if residual is None:
        return False, "; ".join(n for n in wiring.notes if n.startswith("no residual"))
    text = (
        f"{describe(residual.node)} adds it to the stream '{residual.operand.name}' "
        f"(norm position: {wiring.norm_position or 'none'})"
    )
    if wiring.branch is not None:
        text = (
            f"parallel block: {describe(wiring.branch.node)} joins it with its sibling branch "
            f"'{wiring.branch.operand.name}', then " + text.replace(" it ", " both ", 1)
        )
    return True, text


def _sublayer_rows(block: int, label: str, wiring: Wiring) -> list[Explanation]:
    found, why = _norm_row(wiring)
    rows = [Explanation(block, f"{label} norm", found, why)]
    found, why = _residual_row(wiring)
    rows.append(Explanation(block, f"{label} residual", found, why))
    return rows


def explain_blocks(blocks: list[Block]) -> list[Explanation]:
    """Per block: its FF, norms, residual Adds and attention, found or not and why."""
    rows = []
    for block in blocks:
        rows.append(Explanation(block.index, "FF", True, _feedforward(block.ff)))
        rows += _sublayer_rows(block.index, "FF", block.ff_wiring)
        if block.attention is None or block.attention_wiring is None:
            rows.append(Explanation(block.index, "attention", False, "; ".join(block.notes)))
            continue
        rows.append(Explanation(block.index, "attention", True, _attention(block.attention)))
        rows += _sublayer_rows(block.index, "attention", block.attention_wiring)
    return rows


def explain_rejections(
    rejected: list[Rejection] | tuple[Rejection, ...], *, every: bool = False
) -> list[Explanation]:
    """Candidates that were not taken, near misses first. Unless ``every``, the plainly-other
    linear layers (attention projections, LM head: depth 0) are counted in one row."""
    ranked = sorted(rejected, key=lambda r: -r.depth)
    listed = [r for r in ranked if every or r.depth > 0 or r.what != "FF"]
    rows = [Explanation(None, f"{r.what} candidate {r.node}", False, r.reason) for r in listed]
    plain = len(rejected) - len(listed)
    if plain:
        rows.append(
            Explanation(
                None,
                "other linear layers",
                False,
                f"{plain} read a non-elementwise input (attention projections, LM head, ...): "
                "not down-projections",
            )
        )
    return rows
