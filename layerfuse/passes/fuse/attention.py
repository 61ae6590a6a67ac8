"""Which attention sublayers FFN Fusion removes: importance, best window, or grow-to-budget.

Every candidate set is removed in memory (:class:`Reducer`) and the model is scored on
validation data; the least harmful removals win. Removing individually unimportant sublayers
scatters them and leaves short FFN runs; ``contiguous`` instead finds the best window of N
consecutive sublayers, which leaves one run of N + 1 FFNs to fuse.
"""

from __future__ import annotations

__all__ = ["Reducer", "attention_importance", "choose_attention"]

from pathlib import Path
from typing import TYPE_CHECKING

import onnx_ir as ir

from layerfuse.errors import PlanError
from layerfuse.passes.detect import ModelStructure
from layerfuse.passes.fuse.plan import FusePlan, fused_members
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import search_best
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import Reporter

if TYPE_CHECKING:
    from layerfuse.passes.fuse.planner import FuseRequest


class Reducer:
    """In-memory copies of the model with chosen attention sublayers removed."""

    def __init__(self, model_path: Path, structure: ModelStructure) -> None:
        self.model_path = model_path
        self.structure = structure

    def __call__(self, blocks: list[int]) -> ir.Model:
        plan = FusePlan(self.structure.fingerprint, len(self.structure.blocks), blocks, [])
        return apply_plan(self.model_path, plan)


def attention_importance(
    reduce: Reducer, scorer: CandidateScorer, reporter: Reporter
) -> list[float | None]:
    """Validation score of the model with each attention sublayer removed alone."""
    blocks = reduce.structure.blocks
    candidates = [b.index for b in blocks if b.attention is not None]
    _, scores = search_best(
        candidates, lambda index: reduce([index]), scorer, reporter, "attention importance"
    )
    by_block: list[float | None] = [None] * len(blocks)
    for index, score in zip(candidates, scores, strict=True):
        by_block[index] = score
    return by_block


def _fused_members(has_attention: list[bool], dropped: range, include_last: bool) -> int:
    """How many FFNs the run holding ``dropped`` fuses once their attention is removed.

    The run reaches back to the FFN before the first dropped attention and on through blocks
    without attention (see :func:`~layerfuse.passes.fuse.plan.fused_members`)."""
    first = dropped.start
    while first > 0 and not has_attention[first]:
        first -= 1
    last = dropped.stop - 1
    while last + 1 < len(has_attention) and not has_attention[last + 1]:
        last += 1
    return len(fused_members(first, last, include_last))


def _best_window(
    reduce: Reducer, count: int, scorer: CandidateScorer, reporter: Reporter, include_last: bool
) -> tuple[list[int], list[float | None]]:
    """Remove ``count`` consecutive attention sublayers where validation suffers least,
    among the windows that leave a run to fuse (not at block 0 alone, for instance).

    Scores are indexed by the window's first block.
    """
    blocks = reduce.structure.blocks
    starts = []
    for start in range(len(blocks) - count + 1):
        window = range(start, start + count)
        if not all(blocks[b].attention is not None for b in window):
            continue
        has_attention = [b.attention is not None and b.index not in window for b in blocks]
        if _fused_members(has_attention, window, include_last) >= 2:
            starts.append(start)
    if not starts:
        raise PlanError(
            f"no {count} consecutive attention sublayers leave 2 FFNs to fuse"
            + ("" if include_last else " (the last FFN of a run stays out: --include-last)")
        )
    best, scores = search_best(
        starts,
        lambda start: reduce(list(range(start, start + count))),
        scorer,
        reporter,
        "attention windows",
    )
    by_start: list[float | None] = [None] * len(blocks)
    for start, score in zip(starts, scores, strict=True):
        by_start[start] = score
    return list(range(best, best + count)), by_start


def _grow_while_within(
    reduce: Reducer,
    scores: list[float | None],
    limit: float,
    scorer: CandidateScorer,
    reporter: Reporter,
) -> list[int]:
    """Add sublayers, least important first, while the validation score stays within limit."""
    order = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    chosen: list[int] = []
    for _, index in reporter.track(order, len(order), "growing the attention-free set"):
        trial = sorted([*chosen, index])
        if scorer(reduce(trial)) > limit:
            break
        chosen = trial
    return chosen


def choose_attention(
    reduce: Reducer, request: FuseRequest, scorer: CandidateScorer, reporter: Reporter
) -> tuple[list[int], list[float | None], float]:
    """(blocks to drop, per-block or per-window scores, the original's validation score)."""
    available = sum(block.attention is not None for block in reduce.structure.blocks)
    if request.drop_attention != "auto" and not 0 < int(request.drop_attention) <= available:
        raise PlanError(
            f"cannot drop {request.drop_attention} attention sublayers; the model has {available}"
        )
    baseline = scorer(reduce([]))
    if request.contiguous:
        count = int(request.drop_attention)
        dropped, scores = _best_window(reduce, count, scorer, reporter, request.include_last)
        return dropped, scores, baseline
    scores = attention_importance(reduce, scorer, reporter)
    if request.drop_attention == "auto":
        limit = (
            baseline * (1 + request.tolerance)
            if scorer.metric == "perplexity"
            else request.tolerance
        )
        return _grow_while_within(reduce, scores, limit, scorer, reporter), scores, baseline
    order = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    return sorted(i for _, i in order[: int(request.drop_attention)]), scores, baseline
