"""The arms of ``quality_compute.py``: which model, what is merged, how it is distilled."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from common import WORK

from layerfuse.recover.settings import TrainSettings

# Distillation as local_reconstruction.py runs it; the schedule spans more steps than the
# largest budget holds, so the 5/15/30 stops are points on one run.
KD = TrainSettings(
    steps=200, batch_size=4, grad_accum=1, seq_len=128, lr=2e-4, warmup=2,
    eval_every=0, patience=0, valid_tokens=512, seed=0, schedule="steps",
)  # fmt: skip
# MiniLM as recovery.py distils it (16 x 64 tokens; a step costs about a tenth of SmolLM's).
KD_ENCODER = replace(KD, steps=2000, batch_size=16, seq_len=64)
# recover's defaults since recovery_settings.md: peak 5e-4, the cosine fitted to each budget.
KD_FITTED = replace(KD, steps=100_000, lr=5e-4, schedule="budget")


@dataclass(frozen=True)
class Study:
    """One model's arm of the study: what is compressed, how it is distilled and measured."""

    title: str  # of the plot and the Markdown
    model: str
    window: tuple[int, int]  # the FF window merged (merge_quality's best at this ratio)
    kd: TrainSettings
    folder: Path
    results: str  # benchmarks/results/<results>.json|md|png
    variants: tuple[str, ...]
    budgets: str  # the default budgets, CPU-minutes
    metric: str  # the row key of the test quality: perplexity or topic_accuracy

    @property
    def run_per_budget(self) -> bool:
        """A schedule fitted to the budget makes each budget a run of its own (else the
        budgets are stops on one resumed run)."""
        return self.kd.schedule == "budget"


STUDIES = {
    "smollm2-135m": Study(
        "Quality per CPU-minute at a fifth of SmolLM2-135M removed",
        "smollm2-135m", (16, 26), KD, WORK / "quality_compute", "quality_compute",
        ("permute", "prune", "permute + relax 8", "permute + relax 32", "vanilla", "hybrid",
         "permute (KD only)"),
        "0,5,15", "perplexity",
    ),
    # 1/2 of MiniLM's FFs merged: FFs 2-5 tied (3 of 6 removed, 15.7% of the parameters).
    "minilm-l6": Study(
        "Quality per CPU-minute on the encoder: MiniLM-L6, half of its FFs merged",
        "minilm-l6", (2, 5), KD_ENCODER, WORK / "quality_compute" / "minilm-l6",
        "quality_compute_minilm", ("permute", "prune", "permute (KD only)", "vanilla"),
        "0,1,5,15", "topic_accuracy",
    ),
    # The main arm's contest rerun at recover's current defaults (one run per budget).
    "smollm2-135m-fitted": Study(
        "Quality per CPU-minute at a fifth of SmolLM2-135M removed, at recover's defaults",
        "smollm2-135m", (16, 26), KD_FITTED, WORK / "quality_compute" / "fitted",
        "quality_compute_fitted",
        ("permute", "prune", "hybrid", "permute + relax 8", "permute + relax 32",
         "permute + relax 64", "prune as permute + relax 32", "permute (touched)",
         "prune (touched)", "fusion"),
        "0,15,30", "perplexity",
    ),
    # A smaller ratio (issue 25 asks where merging wins): the 5 FFs the planner picks for
    # 4/30 (merge --ratio 4/30: 17-21) tied, 7.9% removed, against as many pruned (3 blocks).
    "smollm2-135m-small": Study(
        "Quality per CPU-minute at 8% of SmolLM2-135M removed, at recover's defaults",
        "smollm2-135m", (17, 21), KD_FITTED, WORK / "quality_compute" / "small",
        "quality_compute_small", ("permute", "prune"), "0,5,15", "perplexity",
    ),
}  # fmt: skip
