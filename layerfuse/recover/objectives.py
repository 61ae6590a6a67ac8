"""What the student is trained to match, as a SUM of per-token terms.

Every objective returns the sum of its terms over a micro-batch and says how many terms a
batch has; the trainer divides by the count of the whole optimizer step (all micro-batches,
all processes). The loss is then exactly the mean over the global batch however it is split
into accumulation steps and processes, which is what makes a 2-process run equal a 1-process
run with the same global batch.

- ``kd`` (causal LMs): ``T^2 * KL(teacher || student)`` of the next-token distributions at
  temperature ``T``, per real position (Hinton et al.; the ``T^2`` keeps gradient sizes
  comparable across temperatures).
- ``lm``: next-token cross-entropy on the text, per real (position, next position) pair.
- ``kd+hidden``: ``kd`` plus ``hidden_weight`` times the mean, over matched block boundaries,
  of the relative squared error ``|s - t|^2 / |t|^2`` of the residual stream at each position
  (relative, so blocks with large activations do not dominate).
- Encoders: ``kd`` is the relative squared error of ``last_hidden_state`` per real token
  (there are no logits); ``kd+hidden`` adds block outputs as above; ``lm`` does not apply.
"""

from __future__ import annotations

__all__ = ["OBJECTIVES", "Objective", "next_token_nll"]

from dataclasses import dataclass, field

import numpy as np
import torch

from layerfuse.errors import LayerfuseError

OBJECTIVES = ("kd", "lm", "kd+hidden")


def _relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor):
    """Per real position: |s - t|^2 / |t|^2 (tensors of any layout ending in the width)."""
    width = teacher.shape[-1]
    s, t = student.reshape(-1, width), teacher.reshape(-1, width)
    keep = mask.reshape(-1).bool()
    s, t = s[keep], t[keep]
    return (s - t).square().sum(-1) / t.square().sum(-1).clamp_min(1e-12)


def next_token_nll(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    """Sum of next-token negative log-likelihoods over real pairs, and how many pairs."""
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    picked = log_probs.gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = (mask[:, 1:] * mask[:, :-1]).bool()
    return -picked[valid].sum(), int(valid.sum())


@dataclass
class Objective:
    name: str
    task: str
    temperature: float = 1.0
    hidden_weight: float = 1.0
    # (student tensor, teacher tensor) at matched block boundaries, for kd+hidden.
    hidden_pairs: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVES:
            raise LayerfuseError(f"unknown objective '{self.name}' (choose kd, lm or kd+hidden)")
        if self.name == "lm" and self.task != "causal-lm":
            raise LayerfuseError("--objective lm needs a causal LM; distil encoders with kd")
        if self.temperature <= 0:
            raise LayerfuseError(f"--temperature must be positive, got {self.temperature}")
        if self.name == "kd+hidden" and not self.hidden_pairs:
            raise LayerfuseError(
                "kd+hidden found no block boundary shared by the two graphs to match"
            )

    @property
    def uses_teacher(self) -> bool:
        return self.name != "lm"

    @property
    def student_taps(self) -> list[str]:
        return [s for s, _ in self.hidden_pairs] if self.name == "kd+hidden" else []

    @property
    def teacher_taps(self) -> list[str]:
        return [t for _, t in self.hidden_pairs] if self.name == "kd+hidden" else []

    def term_count(self, mask: np.ndarray) -> int:
        """How many terms :meth:`loss_sum` adds up for a batch with this attention mask."""
        if self.name == "lm":
            return int((mask[:, 1:] * mask[:, :-1]).sum())
        return int(mask.sum())

    def loss_sum(
        self,
        student: torch.Tensor,
        student_taps: dict[str, torch.Tensor],
        teacher: torch.Tensor | None,
        teacher_taps: dict[str, torch.Tensor],
        ids: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        if self.name == "lm":
            return next_token_nll(student, ids, mask)[0]
        if self.task == "causal-lm":
            scale = self.temperature
            teacher_log = torch.log_softmax(teacher.float() / scale, dim=-1)
            student_log = torch.log_softmax(student.float() / scale, dim=-1)
            per_token = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
            total = scale * scale * per_token[mask.bool()].sum()
        else:
            total = _relative_error(student, teacher, mask).sum()
        if self.name == "kd+hidden":
            errors = [
                _relative_error(student_taps[s], teacher_taps[t], mask).sum()
                for s, t in self.hidden_pairs
            ]
            total = total + self.hidden_weight * torch.stack(errors).sum() / len(errors)
        return total
