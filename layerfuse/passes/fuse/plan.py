"""The fusion plan: which attention sublayers go, which FFN runs become one wide FFN."""

from __future__ import annotations

__all__ = ["FusePlan"]

import os
from dataclasses import dataclass, field
from pathlib import Path

from layerfuse.errors import PlanError
from layerfuse.passes.plan_io import read_plan_json, write_json_atomic

SCHEMA = "layerfuse.fuse-plan/1"


@dataclass
class FusePlan:
    fingerprint: str
    num_blocks: int
    drop_attention: list[int]
    groups: list[tuple[int, int]]
    runs: list[tuple[int, int]] = field(default_factory=list)
    include_last: bool = False
    attention_scores: list[float | None] | None = None
    metric: str | None = None
    baseline_score: float | None = None
    dependency: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.groups = [tuple(g) for g in self.groups]
        self.runs = [tuple(r) for r in self.runs]
        covered: set[int] = set()
        for first, last in self.groups:
            if not 0 <= first <= last < self.num_blocks:
                raise PlanError(
                    f"run {first}-{last} is not a range of consecutive blocks within "
                    f"0-{self.num_blocks - 1}"
                )
            members = set(range(first, last + 1))
            if covered & members:
                raise PlanError(f"run {first}-{last} overlaps another run")
            covered |= members
        outside = [b for b in self.drop_attention if not 0 <= b < self.num_blocks]
        if outside:
            raise PlanError(f"block {outside[0]} is out of range (0-{self.num_blocks - 1})")

    def to_json(self) -> dict:
        return {
            "schema": SCHEMA,
            "fingerprint": self.fingerprint,
            "num_blocks": self.num_blocks,
            "drop_attention": self.drop_attention,
            "groups": [list(g) for g in self.groups],
            "runs": [list(r) for r in self.runs],
            "include_last": self.include_last,
            "metric": self.metric,
            "baseline_score": self.baseline_score,
            "attention_scores": self.attention_scores,
            "dependency": self.dependency,
        }

    def save(self, path: str | os.PathLike) -> Path:
        return write_json_atomic(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> FusePlan:
        data = read_plan_json(path, SCHEMA)
        return cls(
            fingerprint=data["fingerprint"],
            num_blocks=int(data["num_blocks"]),
            drop_attention=[int(b) for b in data["drop_attention"]],
            groups=[tuple(g) for g in data["groups"]],
            runs=[tuple(r) for r in data.get("runs", [])],
            include_last=bool(data.get("include_last", False)),
            attention_scores=data.get("attention_scores"),
            metric=data.get("metric"),
            baseline_score=data.get("baseline_score"),
            dependency=data.get("dependency", []),
        )
