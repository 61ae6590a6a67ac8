"""Block indices and block ranges, as users write them and as plans hold them.

Every command and plan that names blocks goes through these few functions, so ``3,5-7`` means
the same thing everywhere and a range that does not fit the model is refused with the same
words whichever command received it.
"""

from __future__ import annotations

__all__ = ["check_blocks", "check_ranges", "parse_blocks", "parse_ranges"]

from collections.abc import Iterable

from layerfuse.errors import PlanError


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """``"3-8,12-15"`` -> ``[(3, 8), (12, 15)]`` (inclusive block indices)."""
    ranges = []
    for part in text.split(","):
        try:
            first, last = (int(x) for x in part.strip().split("-"))
        except ValueError:
            raise PlanError(f"'{part}' is not a block range like 3-8") from None
        ranges.append((first, last))
    return ranges


def parse_blocks(text: str) -> list[int]:
    """``"3,5-7"`` -> ``[3, 5, 6, 7]``: single blocks and inclusive ranges."""
    blocks: list[int] = []
    for raw in text.split(","):
        part = raw.strip()
        try:
            if "-" in part.lstrip("-"):
                first, last = (int(x) for x in part.split("-"))
                blocks.extend(range(first, last + 1))
            else:
                blocks.append(int(part))
        except ValueError:
            raise PlanError(f"'{text}' is not a list of blocks like 3,5-7") from None
    return blocks


def check_blocks(blocks: Iterable[int], num_blocks: int) -> list[int]:
    """The blocks, sorted, after checking each exists and none is named twice."""
    blocks = list(blocks)
    outside = [b for b in blocks if not 0 <= b < num_blocks]
    if outside:
        raise PlanError(
            f"block {outside[0]} is out of range for a model of {num_blocks} blocks "
            f"(0-{num_blocks - 1})"
        )
    if len(set(blocks)) != len(blocks):
        raise PlanError("a block is named twice")
    return sorted(blocks)


def check_ranges(
    ranges: Iterable[tuple[int, int]], num_blocks: int, *, min_length: int, what: str
) -> list[tuple[int, int]]:
    """Ranges of at least ``min_length`` consecutive blocks, inside the model, disjoint.

    ``what`` names a range in messages ("window", "run").
    """
    checked: list[tuple[int, int]] = []
    covered: set[int] = set()
    for first, last in ranges:
        if not 0 <= first <= last < num_blocks or last - first + 1 < min_length:
            raise PlanError(
                f"{what} {first}-{last} does not fit a model of {num_blocks} blocks "
                f"(0-{num_blocks - 1}, at least {min_length} per {what})"
            )
        members = set(range(first, last + 1))
        if covered & members:
            raise PlanError(f"{what} {first}-{last} overlaps another {what}")
        covered |= members
        checked.append((first, last))
    return checked
