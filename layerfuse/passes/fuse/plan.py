"""The fusion plan: which attention sublayers go, which FFN runs become one wide FFN.

``fuse`` lists what the rewrite fuses (block ranges, each becoming one node);
``ffn_only_runs`` records the maximal runs of FFN-only blocks the analysis found after
removing attention, of which ``fuse`` is a choice. Version 1 files (``groups``/``runs``) still
load.
"""

from __future__ import annotations

__all__ = ["FusePlan", "fused_members"]

from dataclasses import dataclass, field

from layerfuse.passes.blocks import check_blocks, check_ranges
from layerfuse.passes.plan import Plan


def fused_members(first: int, last: int, include_last: bool) -> range:
    """The blocks whose FFNs fusion joins in the FFN-only run ``first``-``last``.

    The run's last FFN stays out unless ``include_last``: it reads the output of all the
    others, so fusing it changes the most (the paper keeps it sequential)."""
    return range(first, last + 1 if include_last else last)


@dataclass
class FusePlan(Plan):
    SCHEMA = "layerfuse.fuse-plan/2"
    READS = ("layerfuse.fuse-plan/1",)

    drop_attention: list[int]
    fuse: list[tuple[int, int]]
    ffn_only_runs: list[tuple[int, int]] = field(default_factory=list)
    include_last: bool = False
    attention_scores: list[float | None] | None = None
    metric: str | None = None
    baseline_score: float | None = None
    dependency: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.fuse = check_ranges(
            [tuple(r) for r in self.fuse], self.num_blocks, min_length=1, what="run"
        )
        self.ffn_only_runs = [tuple(r) for r in self.ffn_only_runs]
        self.drop_attention = check_blocks(self.drop_attention, self.num_blocks)

    def rewrite_pass(self):
        from layerfuse.passes.fuse.rewrite import FuseFeedForwardsPass

        return FuseFeedForwardsPass(self)

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "num_blocks": self.num_blocks,
            "drop_attention": self.drop_attention,
            "fuse": [list(r) for r in self.fuse],
            "ffn_only_runs": [list(r) for r in self.ffn_only_runs],
            "include_last": self.include_last,
            "metric": self.metric,
            "baseline_score": self.baseline_score,
            "attention_scores": self.attention_scores,
            "dependency": self.dependency,
        }

    @classmethod
    def from_json(cls, data: dict) -> FusePlan:
        version_1 = data["schema"] == "layerfuse.fuse-plan/1"
        return cls(
            fingerprint=data["fingerprint"],
            num_blocks=int(data["num_blocks"]),
            drop_attention=[int(b) for b in data["drop_attention"]],
            fuse=[tuple(r) for r in data["groups" if version_1 else "fuse"]],
            ffn_only_runs=[
                tuple(r) for r in data.get("runs" if version_1 else "ffn_only_runs", [])
            ],
            include_last=bool(data.get("include_last", False)),
            attention_scores=data.get("attention_scores"),
            metric=data.get("metric"),
            baseline_score=data.get("baseline_score"),
            dependency=data.get("dependency", []),
        )
