"""Analysis for cross-layer KV sharing: how alike the layers' keys and values are, and which
sharing costs validation quality least.

1. Similarity (as MiniCache and KVSharer measure it): one prefill of calibration text with an
   empty cache; for every pair of layers, the mean cosine similarity of their keys per token
   and head, and likewise of their values; the plan records the average of the two.
2. Candidates: each layer paired with its most similar earlier layer; with ``align`` (the
   default), each candidate's key and value alignment is fitted on the same calibration text
   (:mod:`.align`) and every score below is of the aligned sharing.
3. Choice: every candidate alone is applied in memory and scored on validation data (as the
   other planners choose); ``layers=N`` takes the N best that do not chain (a layer that lends
   its cache keeps its own), ``"auto"`` adds them in that order while the combined plan stays
   within ``tolerance`` of the original's score, explicit pairs are taken as given.
"""

from __future__ import annotations

__all__ = ["ShareKVRequest", "kv_similarity", "plan_share_kv"]

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from layerfuse.errors import PlanError
from layerfuse.model.io import load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.share_kv.align import fit_alignments
from layerfuse.passes.share_kv.layers import KVLayer, kv_layers
from layerfuse.passes.share_kv.plan import ShareKVPlan
from layerfuse.passes.share_kv.prefill import CacheRows, cache_rows
from layerfuse.progress import SILENT, Reporter


@dataclass
class ShareKVRequest:
    """``layers``: ``"auto"``, a count, or explicit ``[(target, source), ...]`` pairs."""

    layers: str | int | list[tuple[int, int]] = "auto"
    tolerance: float = 0.1
    # Fit each pair's key/value alignment on calibration text and fold it in (align.py).
    align: bool = True
    data: DataSettings = field(
        default_factory=lambda: DataSettings(calib_tokens=1024, valid_tokens=2048)
    )


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-12)


def kv_similarity(prefill: CacheRows, layers: list[KVLayer]) -> np.ndarray:
    """[layers x layers] mean cosine similarity of keys and of values, averaged."""
    total = np.zeros((len(layers), len(layers)))
    for rows in prefill:
        unit = {name: _unit(r) for name, r in rows.items()}
        keys = [unit[layer.key.present.name] for layer in layers]
        values = [unit[layer.value.present.name] for layer in layers]
        for a in range(len(layers)):
            for b in range(len(layers)):
                similar_keys = (keys[a] * keys[b]).sum(-1).mean()
                similar_values = (values[a] * values[b]).sum(-1).mean()
                total[a, b] += (similar_keys + similar_values) / 2
    return total / max(len(prefill), 1)


def _non_chaining(ranked: list[tuple[int, int]], limit: int | None) -> list[tuple[int, int]]:
    chosen: list[tuple[int, int]] = []
    for target, source in ranked:
        targets, sources = {t for t, _ in chosen}, {s for _, s in chosen}
        if target in sources or source in targets:
            continue
        chosen.append((target, source))
        if limit is not None and len(chosen) == limit:
            break
    return chosen


def plan_share_kv(
    model_path: str | os.PathLike, request: ShareKVRequest, reporter: Reporter = SILENT
) -> ShareKVPlan:
    """Analyse the ``--kv-cache`` graph at ``model_path``; nothing is written."""
    model_path = Path(model_path)
    model = load_model(model_path)
    layers = kv_layers(model, str(model_path))
    structure = detect_structure(model)
    base = {
        "fingerprint": structure.fingerprint,
        "num_blocks": len(structure.blocks),
        "num_kv_layers": len(layers),
    }
    settings = request.data
    if isinstance(request.layers, list):
        return _given_pairs(model_path, model, layers, base, request, reporter)
    if isinstance(request.layers, int) and not 0 < request.layers < len(layers):
        raise PlanError(f"--layers {request.layers}: choose 1 to {len(layers) - 1} layers")
    reporter.step("measuring how alike the layers' keys and values are")
    calibration = settings.batches(model_path, "calib")
    prefill = cache_rows(model_path, layers, calibration, settings.provider)
    similarity = kv_similarity(prefill, layers)
    candidates = [(t, int(np.argmax(similarity[t, :t]))) for t in range(1, len(layers))]
    fitted = {}
    if request.align:
        reporter.step("fitting each candidate pair's key and value alignment")
        fitted = fit_alignments(prefill, layers, candidates)

    def make(pairs: list[tuple[int, int]]) -> ShareKVPlan:
        plan = ShareKVPlan(**base, pairs=pairs)
        plan.alignments = {pair: fitted[pair] for pair in pairs if pair in fitted}
        return plan

    scorer = settings.scorer(model_path)
    original = scorer(load_model(model_path))
    scores = []
    for pair in reporter.track(candidates, len(candidates), "scoring shared layers"):
        scores.append(scorer(apply_plan(model_path, make([pair]))))
    ranked = [candidates[i] for i in np.argsort(scores)]
    if isinstance(request.layers, int):
        pairs = _non_chaining(ranked, request.layers)
    else:
        pairs = _auto(model_path, make, ranked, scorer, original * (1 + request.tolerance))
    plan = make(pairs)
    plan.similarity = similarity.round(4).tolist()
    plan.validation = {
        "metric": scorer.metric,
        "original": original,
        "candidates": [
            {"pair": list(p), "score": s} for p, s in zip(candidates, scores, strict=True)
        ],
    }
    plan.validation["shared"] = scorer(apply_plan(model_path, plan))
    return plan


def _given_pairs(model_path: Path, model, layers, base: dict, request, reporter) -> ShareKVPlan:
    """The pairs as given, checked, with their alignments fitted when asked."""
    plan = ShareKVPlan(**base, pairs=request.layers)
    plan.rewrite_pass().requires(model)
    if request.align:
        reporter.step("fitting each pair's key and value alignment")
        calibration = request.data.batches(model_path, "calib")
        used = [layers[i] for i in sorted({i for pair in plan.pairs for i in pair})]
        prefill = cache_rows(model_path, used, calibration, request.data.provider)
        plan.alignments = fit_alignments(prefill, layers, plan.pairs)
    return plan


def _auto(model_path: Path, make, ranked, scorer, limit: float) -> list[tuple[int, int]]:
    """The longest prefix of the non-chaining ranking whose combined score stays in limit."""
    chosen: list[tuple[int, int]] = []
    for pair in _non_chaining(ranked, None):
        trial = make([*chosen, pair])
        if scorer(apply_plan(model_path, trial)) > limit:
            break
        chosen.append(pair)
    if not chosen:
        raise PlanError(
            "no layer can share another's keys and values within the tolerance; raise "
            "--tolerance or name the count with --layers N"
        )
    return chosen
