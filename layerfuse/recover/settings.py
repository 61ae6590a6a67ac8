"""How recovery trains: the options of its distillation (steps, batch, schedule, budget).

Every field declares its help and rules (:func:`layerfuse.options.option`), from which the
command line's options are generated, so a setting is declared once.
"""

from __future__ import annotations

__all__ = ["TrainSettings"]

import math
from dataclasses import asdict, dataclass

from layerfuse.errors import LayerfuseError
from layerfuse.options import check_options, option


@dataclass
class TrainSettings:
    """Defaults: 100 steps of 4 x 128 tokens at a peak rate of 5e-4, picked by quality per
    CPU-minute (``benchmarks/results/recovery_settings.md``: SmolLM2-135M with 8 blocks pruned,
    5 CPU-minutes each: 5e-4 reached 120 where 1e-4 reached 140, 2e-4 131 and 1e-3 127; 4 x 128
    beat 8 x 128 and 4 x 64)."""

    steps: int = option(100, "optimizer steps", positive=True)
    batch_size: int = option(
        4, "sequences per micro-batch, shared out over processes", positive=True
    )
    grad_accum: int = option(1, "micro-batches accumulated per optimizer step", positive=True)
    seq_len: int = option(128, "tokens per sequence", positive=True)
    lr: float = option(5e-4, "peak AdamW learning rate", positive=True)
    warmup: int = option(10, "linear warm-up steps, then cosine decay to --min-lr-ratio")
    min_lr_ratio: float = option(0.1, "learning rate at the last step, as a share of --lr")
    weight_decay: float = option(0.0, "AdamW weight decay")
    clip: float = option(1.0, "gradient norm clip (0: none)")
    eval_every: int = option(25, "validate every N steps, 0 never; the best is kept")
    patience: int = option(3, "stop after N validations without improvement, 0 never")
    valid_tokens: int = option(4096, "tokens of the valid split to validate on")
    seed: int = option(0, "seed of the data order and of the local stage")
    precision: str = option(
        "fp32",
        "fp32, or bf16: forward and backward under bfloat16 autocast (a GPU's tensor cores; "
        "weights, gradients and AdamW stay float32)",
        choices=("fp32", "bf16"),
    )
    budget_minutes: float = option(
        0.0,
        "CPU-minutes (user+system, local stage included; 0: none): distillation stops after "
        "the step during which the run's CPU time passed it",
    )
    schedule: str = option(
        "auto",
        "what the cosine decays over: steps (to the last step), budget (to whichever comes "
        "first, the last step or the end of the CPU budget's distillation part), auto (budget "
        "when --budget-minutes is set)",
        choices=("auto", "steps", "budget"),
    )

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.grad_accum

    def check(self, world_size: int) -> None:
        check_options(self)
        if self.batch_size % world_size:
            raise LayerfuseError(
                f"--batch-size {self.batch_size} must be a multiple of the {world_size} processes"
            )

    @property
    def fits_budget(self) -> bool:
        """Whether the cosine decays over the CPU budget (else over the steps). A budget run
        stopped with its rate still near the peak wastes the steps it had; fitted, it ends
        annealed, as a run sized to the budget in steps would."""
        return self.budget_minutes > 0 and self.schedule in ("auto", "budget")

    def run_key(self) -> dict:
        """The settings that shape a run's trajectory, which a resume must match. A
        step-scheduled budget only says where to stop (a resume may raise it, like
        stop_after); a fitted one shapes the rate. Options added since checkpoints had keys
        stay out at their old behaviour (float32, the step schedule), so older checkpoints
        resume."""
        unkeyed = {"budget_minutes", "schedule"} if not self.fits_budget else set()
        return {
            k: v
            for k, v in asdict(self).items()
            if k not in unkeyed and (k, v) != ("precision", "fp32")
        }

    def learning_rate_factor(self, step: int, budget_progress: float = 0.0) -> float:
        """Linear warm-up to 1, then cosine decay to ``min_lr_ratio`` at the last step, or
        (``fits_budget``) sooner, as ``budget_progress`` (the share of the budget's
        distillation part spent) reaches 1."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / span)
        if self.fits_budget:
            progress = max(progress, min(1.0, budget_progress))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine
