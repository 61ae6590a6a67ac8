"""Choosing the next token: greedy, or sampling with temperature and nucleus (top-p).

Sampling is seeded (one numpy generator per run), so ``--seed`` makes a sampled generation
reproducible. Greedy decoding takes the first maximum, like torch's ``argmax``, so ties break
the way Hugging Face's ``generate`` breaks them.
"""

from __future__ import annotations

__all__ = ["GREEDY", "Sampler", "Sampling"]

from dataclasses import dataclass

import numpy as np

from layerfuse.errors import LayerfuseError


@dataclass(frozen=True)
class Sampling:
    """How to pick tokens: ``sample=False`` is greedy; otherwise temperature and top-p."""

    sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise LayerfuseError(f"temperature must be positive, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LayerfuseError(f"top-p must be in (0, 1], got {self.top_p}")


GREEDY = Sampling()


class Sampler:
    """Turns logits ``[batch, vocab]`` into one token per row."""

    def __init__(self, settings: Sampling) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        if not self.settings.sample:
            return logits.argmax(axis=-1).astype(np.int64)
        scaled = logits.astype(np.float64) / self.settings.temperature
        scaled -= scaled.max(axis=-1, keepdims=True)
        probs = np.exp(scaled)
        probs /= probs.sum(axis=-1, keepdims=True)
        return np.array([self._draw(row) for row in probs], dtype=np.int64)

    def _draw(self, probs: np.ndarray) -> int:
        """One token from the smallest set of most likely tokens holding ``top_p`` mass."""
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # Rounding can leave the total just below 1: never keep more than every token.
        keep = min(int(np.searchsorted(cumulative, self.settings.top_p)) + 1, probs.size)
        chosen = order[:keep]
        weights = probs[chosen] / probs[chosen].sum()
        return int(chosen[self.rng.choice(keep, p=weights)])
