"""One merge window: the FFs that will share weights and how each one's neurons are permuted.

Its own module because both the plan (which lists windows) and the rewrite passes (which
apply one window at a time) read it, and the plan creates those passes.
"""

from __future__ import annotations

__all__ = ["MergeWindow"]

from dataclasses import dataclass, field


@dataclass
class MergeWindow:
    """Consecutive FF sublayers (block indices) that will read one set of weights."""

    blocks: list[int]
    anchor: int
    permutations: dict[int, list[int]] = field(default_factory=dict)
    matched_correlation: dict[int, float] = field(default_factory=dict)
    identity_correlation: dict[int, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "blocks": self.blocks,
            "anchor": self.anchor,
            "matched_correlation": {str(k): v for k, v in self.matched_correlation.items()},
            "identity_correlation": {str(k): v for k, v in self.identity_correlation.items()},
            "permutations": {str(k): v for k, v in self.permutations.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> MergeWindow:
        return cls(
            blocks=[int(b) for b in data["blocks"]],
            anchor=int(data["anchor"]),
            permutations={int(k): [int(i) for i in v] for k, v in data["permutations"].items()},
            matched_correlation={int(k): v for k, v in data.get("matched_correlation", {}).items()},
            identity_correlation={
                int(k): v for k, v in data.get("identity_correlation", {}).items()
            },
        )
