"""The share-kv plan: which attention layer reads which earlier layer's keys and values.

Cross-layer KV sharing (Cross-Layer Attention, Brandon et al. 2024; MiniCache; KVSharer):
layer ``target`` attends with the keys and values layer ``source`` computed (``source <
target``), so ``target`` needs no key/value projections and no cache of its own; its queries
and output projection stay. Keys are shared after the rotary embedding, which both layers
apply at the same positions. Layers are counted in graph order among the layers that have a
cache (so a model whose attention was partly removed counts its remaining layers).
"""

from __future__ import annotations

__all__ = ["ShareKVPlan"]

from dataclasses import dataclass, field
from pathlib import Path

from layerfuse.errors import PlanError
from layerfuse.passes.plan import Plan, read_sidecar, write_sidecar
from layerfuse.passes.share_kv.align import Alignment


@dataclass
class ShareKVPlan(Plan):
    SCHEMA = "layerfuse.share-kv-plan/1"

    num_kv_layers: int = 0
    # (target, source): target reads source's keys and values.
    pairs: list[tuple[int, int]] = field(default_factory=list)
    # Mean cosine similarity of the layers' keys and values on calibration text.
    similarity: list[list[float]] | None = None
    # Validation scores: {"metric", "original", "candidates": [{"pair", "score"}], "shared"}.
    validation: dict | None = None
    # Aligned sharing (see align.py): each pair's fitted maps, folded into the target's query
    # and output projections; kept in a sidecar, their conventions and residuals in the JSON.
    alignments: dict[tuple[int, int], Alignment] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pairs = [(int(t), int(s)) for t, s in self.pairs]
        if not self.pairs:
            raise PlanError("the share-kv plan has no pairs: it would share nothing")
        targets = [t for t, _ in self.pairs]
        sources = {s for _, s in self.pairs}
        for target, source in self.pairs:
            if not 0 <= source < target < self.num_kv_layers:
                raise PlanError(
                    f"pair {target}<-{source}: a layer reads an earlier layer's keys and "
                    f"values (0 <= source < target < {self.num_kv_layers})"
                )
        if len(set(targets)) != len(targets):
            raise PlanError("a layer can read the keys and values of one other layer only")
        if sources & set(targets):
            chained = sorted(sources & set(targets))[0]
            raise PlanError(
                f"layer {chained} both shares another layer's cache and lends its own; "
                f"point its readers at the layer it reads from"
            )

    @property
    def shared_layers(self) -> int:
        return len(self.pairs)

    def alignment_record(self) -> list[dict] | None:
        if not self.alignments:
            return None
        return [
            {
                "pair": list(pair),
                "convention": a.convention,
                "key_residual": round(a.key_residual, 5),
                "value_residual": round(a.value_residual, 5),
            }
            for pair, a in self.alignments.items()
        ]

    def save_sidecars(self, path: Path, data: dict) -> None:
        if not self.alignments:
            return
        arrays = {}
        for (target, source), alignment in self.alignments.items():
            arrays[f"{target}-{source}/key_scale"] = alignment.key_scale
            arrays[f"{target}-{source}/value_map"] = alignment.value_map
        data["alignment"] = {"pairs": self.alignment_record(), **write_sidecar(path, arrays)}

    def load_sidecars(self, path: Path, data: dict) -> None:
        record = data.get("alignment")
        if not record:
            return
        arrays = read_sidecar(path, record, "alignment maps")
        for entry in record["pairs"]:
            key = "-".join(map(str, entry["pair"]))
            self.alignments[tuple(entry["pair"])] = Alignment(
                entry["convention"], arrays[f"{key}/key_scale"], arrays[f"{key}/value_map"],
                entry["key_residual"], entry["value_residual"],
            )  # fmt: skip

    def rewrite_pass(self):
        from layerfuse.passes.share_kv.rewrite import ShareKVPass

        return ShareKVPass(self)

    def to_json(self) -> dict:
        return {
            "fingerprint": self.fingerprint,
            "num_blocks": self.num_blocks,
            "num_kv_layers": self.num_kv_layers,
            "pairs": [list(pair) for pair in self.pairs],
            "similarity": self.similarity,
            "validation": self.validation,
        }

    @classmethod
    def from_json(cls, data: dict) -> ShareKVPlan:
        return cls(
            fingerprint=data["fingerprint"],
            num_blocks=int(data["num_blocks"]),
            num_kv_layers=int(data["num_kv_layers"]),
            pairs=[tuple(pair) for pair in data["pairs"]],
            similarity=data.get("similarity"),
            validation=data.get("validation"),
        )
