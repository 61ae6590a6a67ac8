"""What one ``optimize`` run asks for, and the key that tells its state from another's."""

from __future__ import annotations

__all__ = ["OptimizeRequest"]

from dataclasses import dataclass
from pathlib import Path

from layerfuse.optimize.space import SearchSpace
from layerfuse.optimize.targets import QualityLimit, RecoverBudget, Target


@dataclass
class OptimizeRequest:
    model: Path
    output: Path
    target: Target
    limit: QualityLimit
    budget: RecoverBudget
    space: SearchSpace
    data: str = "fortunes"
    provider: str = "auto"
    seed: int = 0
    # torch device of recovery (cpu or cuda); a time budget still counts CPU time.
    device: str = "cpu"
    # Stop after this stage (as an interrupted run would), to continue by running again.
    stop_after: str | None = None
    # Also measure each recovered finalist quantized (int4 or int8) as a finalist of its own.
    quantize: str | None = None

    def key(self, fingerprint: str) -> dict:
        return {
            "model": fingerprint,
            "target": self.target.to_json(),
            "limit": self.limit.to_json(),
            "budget": self.budget.to_json(),
            "space": self.space.to_json(),
            "data": self.data,
            "seed": self.seed,
            # Only a non-default device enters the key (older states stay resumable).
            **({"device": self.device} if self.device != "cpu" else {}),
            **({"quantize": self.quantize} if self.quantize else {}),
        }
