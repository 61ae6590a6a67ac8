"""Analysis for FFN Fusion: which attention to remove, which runs to fuse, how dependent.

1. Attention importance: each attention sublayer is removed alone (in memory) and the model
   is scored on validation data; the smallest degradation marks the least important sublayer
   (the practical stand-in for the paper's Puzzle search). ``drop_attention`` takes the N
   least important, or with ``"auto"`` adds them in that order while the validation score
   stays within ``tolerance`` of the original.
2. Runs: maximal sequences of FFN sublayers with no attention between them. The paper leaves
   the last FFN of each run out of the fusion (``include_last=False``).
3. Dependency: for blocks i < j of a run, how much FFN j's output changes (mean cosine
   distance over calibration tokens) when FFN i is removed. Low values mean the FFNs barely
   feed each other and can run in parallel; with ``max_dependency`` a run is split where a
   member depends on an earlier one more than that.
"""

from __future__ import annotations

__all__ = [
    "FuseRequest",
    "apply_fuse_plan",
    "attention_importance",
    "dependency_matrix",
    "find_runs",
    "plan_fuse",
]

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from layerfuse.data.batches import InputBatch, make_batches
from layerfuse.errors import PlanError
from layerfuse.model.io import load_model
from layerfuse.passes.detect import ModelStructure, detect_structure, fingerprint
from layerfuse.passes.fuse.plan import FusePlan
from layerfuse.passes.fuse.rewrite import FuseFeedForwardsPass
from layerfuse.passes.plan_io import check_fingerprint
from layerfuse.passes.prune import PrunePlan, PruneSublayersPass
from layerfuse.passes.running import run_pass
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import ActivationTap, token_rows


@dataclass
class FuseRequest:
    drop_attention: int | str | list[int] | None = None
    contiguous: bool = False
    runs: str | list[tuple[int, int]] = "auto"
    include_last: bool = False
    max_dependency: float | None = None
    tolerance: float = 0.1
    data: str = "fortunes"
    tokens: int = 2048
    seq_len: int = 128
    batch_size: int = 8
    provider: str = "auto"


def _without_attention(model_path: Path, structure: ModelStructure, blocks: list[int]) -> ir.Model:
    model = load_model(model_path)
    if blocks:
        plan = PrunePlan(structure.fingerprint, len(structure.blocks), "attention", blocks)
        run_pass(PruneSublayersPass(plan), model)
    return model


def attention_importance(
    model_path: Path, structure: ModelStructure, scorer: CandidateScorer, reporter: Reporter
) -> list[float | None]:
    """Validation score of the model with each attention sublayer removed alone."""
    candidates = [b.index for b in structure.blocks if b.attention is not None]
    scores: list[float | None] = [None] * len(structure.blocks)
    for index in reporter.track(candidates, len(candidates), "attention importance"):
        scores[index] = scorer(_without_attention(model_path, structure, [index]))
    return scores


def _choose_attention(
    model_path: Path,
    structure: ModelStructure,
    request: FuseRequest,
    scorer: CandidateScorer,
    reporter: Reporter,
) -> tuple[list[int], list[float | None], float]:
    available = sum(block.attention is not None for block in structure.blocks)
    if request.drop_attention != "auto" and not 0 < int(request.drop_attention) <= available:
        raise PlanError(
            f"cannot drop {request.drop_attention} attention sublayers; the model has {available}"
        )
    baseline = scorer(load_model(model_path))
    if request.contiguous:
        return (
            *_best_window(model_path, structure, int(request.drop_attention), scorer, reporter),
            baseline,
        )
    scores = attention_importance(model_path, structure, scorer, reporter)
    order = sorted((s, i) for i, s in enumerate(scores) if s is not None)
    if request.drop_attention == "auto":
        limit = (
            baseline * (1 + request.tolerance)
            if scorer.metric == "perplexity"
            else request.tolerance
        )
        chosen: list[int] = []
        for _, index in reporter.track(order, len(order), "growing the attention-free set"):
            trial = sorted([*chosen, index])
            if scorer(_without_attention(model_path, structure, trial)) > limit:
                break
            chosen = trial
        return chosen, scores, baseline
    return sorted(i for _, i in order[: int(request.drop_attention)]), scores, baseline


def _best_window(
    model_path: Path,
    structure: ModelStructure,
    count: int,
    scorer: CandidateScorer,
    reporter: Reporter,
) -> tuple[list[int], list[float | None]]:
    """Remove ``count`` consecutive attention sublayers where validation suffers least.

    Removing the individually least important sublayers scatters them and leaves few runs
    to fuse; a contiguous window yields one run of ``count + 1`` FFNs. Scores are indexed by
    the window's first block.
    """
    starts = [
        start
        for start in range(len(structure.blocks) - count + 1)
        if all(structure.blocks[b].attention is not None for b in range(start, start + count))
    ]
    scores: list[float | None] = [None] * len(structure.blocks)
    for start in reporter.track(starts, len(starts), "attention windows"):
        blocks = list(range(start, start + count))
        scores[start] = scorer(_without_attention(model_path, structure, blocks))
    best = min(starts, key=lambda start: scores[start])
    return list(range(best, best + count)), scores


def find_runs(structure: ModelStructure) -> list[tuple[int, int]]:
    """Maximal (first, last) block ranges whose FFNs have no attention between them."""
    runs, start = [], 0
    for block in structure.blocks[1:]:
        if block.attention is not None:
            if block.index - 1 > start:
                runs.append((start, block.index - 1))
            start = block.index
    if structure.blocks[-1].index > start:
        runs.append((start, structure.blocks[-1].index))
    return runs


def dependency_matrix(
    model: ir.Model,
    model_dir: Path,
    run: tuple[int, int],
    batches: list[InputBatch],
    provider: str,
) -> np.ndarray:
    """``M[i, j]``: mean cosine distance of FFN j's output with and without FFN i (i < j)."""
    first, last = run
    structure = detect_structure(model)
    members = list(range(first, last + 1))
    names = [structure.blocks[b].ff.output.name for b in members]

    def outputs(candidate: ir.Model, wanted: list[str]) -> list[dict[str, np.ndarray]]:
        tap = ActivationTap(candidate, wanted, provider=provider, external_data_dir=model_dir)
        collected = []
        for batch in batches:
            _, tapped = tap.run(batch.feeds)
            collected.append({n: token_rows(v, batch.mask) for n, v in tapped.items()})
        return collected

    reference = outputs(model, names)
    matrix = np.zeros((len(members), len(members)))
    for row, removed in enumerate(members[:-1]):
        candidate = ir.serde.deserialize_model(ir.serde.serialize_model(model))
        ir.external_data.set_base_dir(candidate.graph, model_dir)
        plan = PrunePlan(fingerprint(candidate), len(structure.blocks), "ff", [removed])
        run_pass(PruneSublayersPass(plan), candidate)
        changed = outputs(candidate, names[row + 1 :])
        for column in range(row + 1, len(members)):
            name = names[column]
            distances = []
            for base, new in zip(reference, changed, strict=True):
                a, b = base[name], new[name]
                cos = (a * b).sum(1) / np.maximum(
                    np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12
                )
                distances.append(1.0 - cos)
            matrix[row, column] = float(np.concatenate(distances).mean())
    return matrix


def _batches(model_path: Path, request: FuseRequest, split: str) -> list:
    return make_batches(
        model_path,
        request.data,
        split,
        tokens=request.tokens,
        seq_len=request.seq_len,
        batch_size=request.batch_size,
    )


def plan_fuse(
    model_path: str | os.PathLike, request: FuseRequest, reporter: Reporter = SILENT
) -> FusePlan:
    model_path = Path(model_path)
    structure = detect_structure(load_model(model_path))
    num_blocks = len(structure.blocks)
    scores, baseline, metric = None, None, None
    dropped: list[int] = []
    scorer = None
    if isinstance(request.drop_attention, list):
        dropped = sorted(request.drop_attention)
        missing = [
            b for b in dropped if not 0 <= b < num_blocks or structure.blocks[b].attention is None
        ]
        if missing:
            raise PlanError(f"block {missing[0]} has no attention sublayer to drop")
    elif request.drop_attention is not None:
        valid = _batches(model_path, request, "valid")
        scorer = CandidateScorer(model_path, valid, data=request.data, provider=request.provider)
        dropped, scores, baseline = _choose_attention(
            model_path, structure, request, scorer, reporter
        )
        metric = scorer.metric
    reduced = _without_attention(model_path, structure, dropped)
    reduced_structure = detect_structure(reduced)
    runs = find_runs(reduced_structure)
    if request.runs == "auto":
        candidates = runs
    else:
        candidates = [tuple(r) for r in request.runs]
        covered: set[int] = set()
        for first, last in candidates:
            if not 0 <= first < last < num_blocks:
                raise PlanError(
                    f"run {first}-{last} is not a range of at least two consecutive blocks "
                    f"within 0-{num_blocks - 1}"
                )
            if covered & set(range(first, last + 1)):
                raise PlanError(f"run {first}-{last} overlaps another run")
            covered |= set(range(first, last + 1))
    dependency = []
    if request.max_dependency is not None or request.runs == "auto":
        batches = _batches(model_path, request, "calib")
        for run in reporter.track(candidates, len(candidates), "block dependency"):
            if run[1] - run[0] + 1 < 2:
                continue
            matrix = dependency_matrix(reduced, model_path.parent, run, batches, request.provider)
            dependency.append({"run": list(run), "matrix": matrix.tolist()})
    groups = []
    for first, last in candidates:
        end = last if request.include_last else last - 1
        members = list(range(first, end + 1))
        if request.max_dependency is not None:
            matrix = next(
                (np.asarray(d["matrix"]) for d in dependency if d["run"] == [first, last]), None
            )
            groups.extend(_split_by_dependency(members, first, matrix, request.max_dependency))
        elif len(members) >= 2:
            groups.append((members[0], members[-1]))
    plan = FusePlan(
        fingerprint=structure.fingerprint,
        num_blocks=num_blocks,
        drop_attention=dropped,
        groups=groups,
        runs=runs,
        include_last=request.include_last,
        attention_scores=scores,
        metric=metric,
        baseline_score=baseline,
        dependency=dependency,
    )
    run_pass(FuseFeedForwardsPass(plan.groups), reduced)  # validates the groups now
    return plan


def _split_by_dependency(
    members: list[int], first: int, matrix: np.ndarray | None, threshold: float
) -> list[tuple[int, int]]:
    groups, current = [], [members[0]] if members else []
    for block in members[1:]:
        depends = matrix is not None and any(
            matrix[earlier - first, block - first] > threshold for earlier in current
        )
        if depends:
            if len(current) >= 2:
                groups.append((current[0], current[-1]))
            current = [block]
        else:
            current.append(block)
    if len(current) >= 2:
        groups.append((current[0], current[-1]))
    return groups


def apply_fuse_plan(model_path: str | os.PathLike, plan: FusePlan) -> ir.Model:
    """Remove the plan's attention sublayers, then fuse its runs (in memory)."""
    model = load_model(model_path)
    check_fingerprint(model, plan.fingerprint)
    structure = detect_structure(model)
    model = _without_attention(Path(model_path), structure, plan.drop_attention)
    run_pass(FuseFeedForwardsPass(plan.groups), model)
    return model
