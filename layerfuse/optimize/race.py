"""Spend the recovery budget where it pays: scout every finalist, then train the leader.

An even split gives each of n finalists 1/n of the budget, so the model that wins gets a
fraction of what the user paid for, and at CPU budgets quality is still falling steeply when
its share ends. Instead (successive halving with one round):

1. **scout**: ``scout_share`` of the budget, split evenly (what one finalist leaves unspent
   goes to the next), recovers every finalist; each scouted model is scored on the valid split
   with the screening scorer (test text stays unseen);
2. **lead**: the rest of the budget continues the best-scoring finalist from its scouted
   weights (no second local stage; a new warm-up and cosine over the remaining steps).

``scout_share`` 1 is the even split. Every finalist is still measured side by side; the
report shows each one's scouted score and which one led.
"""

from __future__ import annotations

__all__ = ["recover_finalists"]

from pathlib import Path

from layerfuse.optimize.candidates import Candidate
from layerfuse.optimize.finalists import prepare_finalist
from layerfuse.optimize.recovery import RecoverShare, recover_finalist
from layerfuse.optimize.request import OptimizeRequest
from layerfuse.optimize.state import SearchState
from layerfuse.passes.scoring import CandidateScorer
from layerfuse.progress import Reporter


def _share(request: OptimizeRequest, seconds: float | None, tokens: int | None, space=None):
    return RecoverShare(
        seconds=seconds,
        tokens=tokens,
        space=space or request.space.recover,
        data=request.data,
        valid_tokens=request.space.screen["valid_tokens"],
        seed=request.seed,
        device=request.device,
    )


def _spent(state: SearchState, section: str) -> float:
    return sum(r["cpu_seconds"] for r in state.data["done"].get(section, {}).values())


def _scout(request, state, finalists, fraction, scorer, reporter) -> None:
    budget = request.budget
    for index, candidate in enumerate(finalists):
        folder = request.output / "finalists" / candidate.name
        record = state.get("recover", candidate.name)
        if record is None:
            compressed, plan = prepare_finalist(request.model, candidate, folder)
            seconds = tokens = None  # this finalist's share of the scouting part
            if budget.tokens is not None:
                tokens = int(budget.tokens * fraction) // len(finalists)
            else:
                left = budget.seconds * fraction - _spent(state, "recover")
                seconds = left / (len(finalists) - index)
            if seconds is not None and seconds <= 0:
                reporter.step(f"{candidate.name}: no budget left; measured unrecovered")
                record = {"cpu_seconds": 0.0, "wall_seconds": 0.0, "steps": 0, "tokens": 0}
                record.update(model=str(compressed), note="no budget left")
            else:
                share = _share(request, seconds, tokens)
                reporter.step(f"recovering {candidate.name} ({index + 1}/{len(finalists)})")
                record = recover_finalist(request.model, compressed, plan, folder, share, reporter)
                record["model"] = str(folder / "model.onnx")
            record["plan"] = None if plan is None else str(plan)
            if scorer is not None:
                record["scout_score"] = scorer.score_file(record["model"])
            state.put("recover", record, candidate.name)
        else:
            reporter.step(f"recovering {candidate.name}: done earlier")
        candidate.results["recover"] = record


def _lead(request, state, finalists, reporter) -> Candidate | None:
    """Continue the best-scouted finalist with the rest of the budget; it, or None."""
    budget = request.budget
    scored = [c for c in finalists if c.results["recover"].get("scout_score") is not None]
    if not scored:
        return None
    leader = min(scored, key=lambda c: (c.results["recover"]["scout_score"], c.name))
    record = state.get("lead", leader.name)
    if record is None:
        seconds = None if budget.seconds is None else budget.seconds - _spent(state, "recover")
        tokens = None
        if budget.tokens is not None:
            tokens = budget.tokens - sum(c.results["recover"]["tokens"] for c in finalists)
        if (seconds is not None and seconds <= 0) or (tokens is not None and tokens <= 0):
            return None
        reporter.step(f"{leader.name} leads after scouting; it gets the rest of the budget")
        scouted = leader.results["recover"]
        plan = None if scouted["plan"] is None else Path(scouted["plan"])
        folder = request.output / "finalists" / leader.name / "lead"
        space = {**request.space.recover, "local_steps": 0}
        record = recover_finalist(
            request.model, Path(scouted["model"]), plan, folder,
            _share(request, seconds, tokens, space), reporter,
        )  # fmt: skip
        record["model"] = str(folder / "model.onnx")
        state.put("lead", record, leader.name)
    return leader


def _merged(scout: dict, lead: dict) -> dict:
    totals = {k: scout[k] + lead[k] for k in ("cpu_seconds", "wall_seconds", "steps", "tokens")}
    local = scout.get("local_seconds", 0.0) + lead.get("local_seconds", 0.0)
    return {**scout, **totals, "local_seconds": local, "model": lead["model"], "lead": lead,
            "scout": {k: scout[k] for k in ("cpu_seconds", "steps", "tokens")}}  # fmt: skip


def recover_finalists(
    request: OptimizeRequest,
    state: SearchState,
    finalists: list[Candidate],
    scorer: CandidateScorer,
    reporter: Reporter,
) -> dict[str, Path]:
    """Recover every finalist (scout, then lead); their models by name."""
    fraction = request.space.recover["scout_share"]
    budget = request.budget
    racing = len(finalists) > 1 and fraction < 1 and (budget.tokens or budget.seconds or 0) > 0
    _scout(request, state, finalists, fraction if racing else 1.0, scorer if racing else None,
           reporter)  # fmt: skip
    leader = _lead(request, state, finalists, reporter) if racing else None
    if leader is not None:
        leader.results["recover"] = _merged(
            leader.results["recover"], state.get("lead", leader.name)
        )
    return {c.name: Path(c.results["recover"]["model"]) for c in finalists}
