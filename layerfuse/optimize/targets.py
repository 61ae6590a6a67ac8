"""What the user asks ``optimize`` for, parsed from the command line's short spellings.

- a size or speed **target**: ``params=0.8`` (at most 80% of the parameters), ``memory=300MB``
  (weights on disk at most 300 MB), ``latency=1.2x`` (at least 1.2x faster at the named shape);
- a **quality limit**: ``10%`` (test perplexity at most 1.10x the original's; causal LMs) or
  ``1pt`` (topic accuracy at most 1 point below the original's; text encoders);
- a **recovery budget**: ``30m``/``90s``/``1h`` (minutes of recovery on this machine's cores)
  or ``100k-tokens`` (training tokens of distillation).

Every mistake is one :class:`LayerfuseError` line naming the accepted spellings.
"""

from __future__ import annotations

__all__ = ["QualityLimit", "RecoverBudget", "Target", "parse_budget", "parse_limit", "parse_target"]

import math
import re
from dataclasses import asdict, dataclass

from layerfuse.errors import LayerfuseError

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}
_SECONDS = {"s": 1, "m": 60, "h": 3600}
TARGET_HELP = "params=0.8 (fraction of parameters kept), latency=1.2x (speed-up), memory=300MB"


@dataclass(frozen=True)
class Target:
    """``kind`` is params, latency or memory; ``value`` a kept fraction, a speed-up or bytes."""

    kind: str
    value: float
    text: str

    def to_json(self) -> dict:
        return asdict(self)

    def met(self, params_ratio: float, speedup: float | None, weight_bytes: int) -> bool:
        if self.kind == "params":
            return params_ratio <= self.value + 1e-9
        if self.kind == "memory":
            return weight_bytes <= self.value
        return speedup is not None and speedup >= self.value


def _number(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


def parse_target(text: str) -> Target:
    """``params=0.8``, ``latency=1.2x`` or ``memory=300MB``."""
    kind, _, raw = text.partition("=")
    kind, raw = kind.strip().lower(), raw.strip().lower()
    try:
        if kind == "params":
            value = _number(raw.removesuffix("%")) / (100 if raw.endswith("%") else 1)
            if value >= 1:
                raise ValueError(raw)
        elif kind == "latency":
            value = _number(raw.removesuffix("x"))
            if value <= 1:
                raise ValueError(raw)
        elif kind == "memory":
            match = re.fullmatch(r"([0-9.]+)\s*([kmg]?i?b)", raw)
            if not match:
                raise ValueError(raw)
            value = _number(match[1]) * _UNITS[match[2]]
        else:
            raise ValueError(kind)
    except ValueError:
        raise LayerfuseError(
            f"--target '{text}' is not a target: use {TARGET_HELP} "
            "(params below 1, latency above 1x)"
        ) from None
    return Target(kind, value, text)


@dataclass(frozen=True)
class QualityLimit:
    """``relative``: perplexity may grow by ``value`` (0.1 = 10%); ``points``: accuracy may
    drop by ``value`` points (on a 0-100 scale)."""

    kind: str
    value: float
    text: str

    def to_json(self) -> dict:
        return asdict(self)

    def check_metric(self, metric: str) -> None:
        wanted = {"perplexity": "relative", "topic_accuracy": "points"}.get(metric)
        if wanted is None:
            raise LayerfuseError(
                f"optimize judges quality by perplexity (causal LMs) or topic accuracy (text "
                f"encoders on fortunes); this model's metric is {metric}"
            )
        if wanted != self.kind:
            example = "10%" if wanted == "relative" else "1pt"
            raise LayerfuseError(
                f"--max-quality-loss {self.text}: this model is judged by {metric}; give the "
                f"limit as {'a percentage' if wanted == 'relative' else 'points'}, e.g. {example}"
            )

    def allows(self, original: float, value: float) -> bool:
        if self.kind == "relative":
            return value <= original * (1 + self.value) * (1 + 1e-9)
        return value >= original - self.value / 100 - 1e-9

    def loss(self, original: float, value: float) -> float:
        """The quality lost in the limit's own unit (a fraction, or points)."""
        if self.kind == "relative":
            return value / original - 1
        return (original - value) * 100


def parse_limit(text: str) -> QualityLimit:
    """``10%`` (perplexity ratio) or ``1pt`` (accuracy points)."""
    raw = text.strip().lower()
    try:
        if raw.endswith("%"):
            return QualityLimit("relative", _number(raw[:-1]) / 100, text)
        for suffix in ("pts", "pt", "points", "point"):
            if raw.endswith(suffix):
                return QualityLimit("points", _number(raw.removesuffix(suffix)), text)
        raise ValueError(raw)
    except ValueError:
        raise LayerfuseError(
            f"--max-quality-loss '{text}' is not a limit: use 10% (perplexity at most 1.1x the "
            "original's) or 1pt (accuracy at most 1 point lower)"
        ) from None


@dataclass(frozen=True)
class RecoverBudget:
    """``seconds`` of recovery on this machine, or ``tokens`` of distillation; one is set."""

    text: str
    seconds: float | None = None
    tokens: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def parse_budget(text: str) -> RecoverBudget:
    """``30m``, ``90s``, ``1.5h`` or ``100k-tokens``/``2M-tokens``; ``0`` skips recovery."""
    raw = text.strip().lower()
    if raw in ("0", "none"):
        return RecoverBudget(text, seconds=0.0)
    tokens = re.fullmatch(r"([0-9.]+)\s*([kmg]?)[- ]?tokens?", raw)
    time = re.fullmatch(r"([0-9.]+)\s*([smh])(?:in|ins|inutes?|ours?|ec|econds?)?", raw)
    try:
        if tokens:
            return RecoverBudget(text, tokens=int(_number(tokens[1]) * _SCALE[tokens[2]]))
        if time:
            return RecoverBudget(text, seconds=_number(time[1]) * _SECONDS[time[2]])
    except ValueError:
        pass
    raise LayerfuseError(
        f"--recover-budget '{text}' is not a budget: use 30m, 90s, 1h (time on this machine) "
        "or 100k-tokens (distillation tokens)"
    )
