"""Propose candidates that should meet the target, from the search space and the model's sizes.

Each kind removes parameters in units (a tied FF, a block, an FF or attention sublayer); the
number of units is the smallest whose estimated removal meets the target, plus the space's
``extra`` units. Estimates come from the detected structure; screening later measures each
plan's real parameter count (and latency), so an estimate that falls short is caught there.
For a latency target the work per token is taken as proportional to the parameters a token
reads, so merges (which keep every multiplication) are not proposed for it. A fusion removes
the attention a plain attention removal does and also runs the FFs it leaves adjacent as one
wide FF (FFN Fusion), so it is sized like attention removal and screening measures the rest.
"""

from __future__ import annotations

__all__ = ["Candidate", "SizeModel", "propose"]

import math
from dataclasses import asdict, dataclass, field

from layerfuse.model.io import load_model, parameter_count, weight_bytes
from layerfuse.optimize.space import SearchSpace
from layerfuse.optimize.targets import Target
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.merge.relax import delta_parameters


@dataclass
class Candidate:
    """One compression to screen: ``kind`` merge/prune/attention/fuse/hybrid and its options."""

    name: str
    kind: str
    options: dict
    estimated_removed: int
    results: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> Candidate:
        return cls(**data)


@dataclass(frozen=True)
class SizeModel:
    """What the estimates need: sizes of the whole model and of each unit kind."""

    parameters: int
    weight_bytes: int
    num_blocks: int
    ff: int
    attention: int
    fingerprint: str
    relax_delta: dict

    @classmethod
    def read(cls, model_path, relax_ranks: list[int]) -> SizeModel:
        model = load_model(model_path)
        structure = detect_structure(model)
        blocks = structure.blocks
        attention = [b.attention.parameter_count for b in blocks if b.attention is not None]
        return cls(
            parameters=parameter_count(model),
            weight_bytes=weight_bytes(model),
            num_blocks=len(blocks),
            ff=round(sum(b.ff.parameter_count for b in blocks) / len(blocks)),
            attention=round(sum(attention) / len(attention)) if attention else 0,
            fingerprint=structure.fingerprint,
            relax_delta={r: delta_parameters(blocks[0].ff, r) for r in relax_ranks},
        )

    def needed(self, target: Target) -> int:
        """Parameters to remove (of the work per token, for latency) to meet ``target``."""
        if target.kind == "params":
            return math.ceil(self.parameters * (1 - target.value))
        if target.kind == "memory":
            per_parameter = self.weight_bytes / self.parameters
            return max(0, math.ceil((self.weight_bytes - target.value) / per_parameter))
        return math.ceil(self.parameters * (1 - 1 / target.value))


def _merges(size: SizeModel, space: SearchSpace, need: int) -> tuple[list[Candidate], list[str]]:
    found, notes, plain = [], [], {}
    for rank in sorted(set(space.merge["relax_ranks"])):
        for windows in space.merge["windows"]:
            delta = size.relax_delta.get(rank, 0)
            removed = next(
                (
                    k
                    for k in range(windows, size.num_blocks - windows + 1)
                    if k * size.ff - (k + windows) * delta >= need
                ),
                None,
            )
            if removed is None:
                notes.append(
                    f"merge in {windows} window(s), relax rank {rank}: cannot remove enough"
                )
                continue
            name = f"merge-{removed}ff-{windows}w" + (f"-r{rank}" if rank else "")
            options = {"removed": removed, "windows": windows, "relax_rank": rank}
            options["method"] = space.merge["method"]
            if rank == 0:
                plain[(removed, windows)] = name
            elif (removed, windows) in plain:
                # The plain tie's windows, relaxed: no second calibration and window search.
                options["relax_of"] = plain[(removed, windows)]
            estimate = removed * size.ff - (removed + windows) * delta
            found.append(Candidate(name, "merge", options, estimate))
    return found, notes


def _hybrids(size: SizeModel, space: SearchSpace, need: int) -> tuple[list[Candidate], list]:
    """Whole blocks pruned for each share of the removal, FFs tied in one window for the rest."""
    block = size.ff + size.attention
    found, notes = [], []
    for share in sorted(set(space.hybrid["prune_shares"])):
        count = max(1, math.floor(need * share / block))
        removed = max(1, math.ceil((need - count * block) / size.ff))
        if removed + 1 > size.num_blocks - count:
            notes.append(f"hybrid at prune share {share:g}: too few blocks left to tie")
            continue
        options = {"count": count, "removed": removed, "windows": 1, "relax_rank": 0}
        options |= {"method": space.merge["method"], "select": space.prune["select"]}
        name = f"hybrid-{count}block-{removed}ff"
        found.append(Candidate(name, "hybrid", options, count * block + removed * size.ff))
    return found, notes


def _counted(
    kind: str,
    unit: int,
    size: SizeModel,
    extra: list[int],
    need: int,
    options: dict,
    least: int = 1,
) -> tuple[list[Candidate], list[str]]:
    label = options.get("target", "attention")
    what = f"{kind} {label}" if kind != label else kind
    if unit <= 0:
        return [], [f"{what}: the model has no such sublayers"]
    smallest = max(least, math.ceil(need / unit))
    found = []
    for more in sorted(set(extra)):
        count = smallest + more
        limit = size.num_blocks - (1 if label == "block" else 0)
        if count > limit:
            return found, [f"{what}: {count} of {size.num_blocks} would be needed, too many"]
        name = f"prune-{count}{label}" if kind == "prune" else f"{kind}-{count}"
        found.append(Candidate(name, kind, {**options, "count": count}, count * unit))
    return found, []


def propose(size: SizeModel, space: SearchSpace, target: Target) -> tuple[list[Candidate], list]:
    """Candidates (in a fixed order) and a note per kind that could not be proposed."""
    need = size.needed(target)
    candidates, notes = [], []
    if space.merge["enabled"]:
        if target.kind == "latency":
            notes.append("merge: a tie keeps every multiplication, so it cannot cut latency")
        else:
            found, why = _merges(size, space, need)
            candidates += found
            notes += why
    if space.hybrid["enabled"] and target.kind != "latency":
        found, why = _hybrids(size, space, need)
        candidates += found
        notes += why
    if space.prune["enabled"]:
        for unit_kind in space.prune["targets"]:
            unit = size.ff + size.attention if unit_kind == "block" else size.ff
            options = {"target": unit_kind, "select": space.prune["select"]}
            found, why = _counted("prune", unit, size, space.prune["extra"], need, options)
            candidates += found
            notes += why
    # A fusion needs 2 attention sublayers gone to leave 2 FFNs to fuse (the run's last stays).
    for kind, least in (("attention", 1), ("fuse", 2)):
        section = getattr(space, kind)
        if section["enabled"]:
            found, why = _counted(kind, size.attention, size, section["extra"], need, {}, least)
            candidates += found
            notes += why
    return candidates, notes
