"""Aligned KV sharing: map the lent keys and values onto the borrower's before it reads them.

Two layers' keys live in bases of their own (as two FFs' neurons come in orders of their
own, which is what aligned merging fixes), so a layer that simply reads another's cache
attends with scores of no meaning and its perplexity explodes. Alignment fits, on
calibration text, the best linear maps from the source layer's keys and values to the
target's, and folds them into the target's query and output projections, so the graph
keeps its shape and its cache and costs nothing more per token:

- keys: per KV head, the rotary embedding turns each pair of dimensions (a complex number)
  by an angle that depends on the position; the only linear maps that commute with every
  such turn scale and turn each pair by a fixed complex number ``m``. Fitting
  ``k_target ~ m k_source`` per pair by least squares (the turns cancel in
  ``conj(k_source) k_target``, so keys after the embedding, as the cache holds them, give
  the same fit) and giving the queries ``conj(m)`` makes ``q' . k_source = q . (m k_source)``;
- values: per KV head, any ``v_target ~ N v_source`` (ridge least squares) moves into the
  output projection: each query head's rows of it become ``N^T`` times them.

Which dimensions form the rotary pairs (``[i, i + d/2]`` as Hugging Face's ``rotate_half``,
or ``[2i, 2i + 1]`` interleaved) is read from the data: the convention under which the
fits of all pairs together leave the smaller residual (the phases cancel only in the right one).
"""

from __future__ import annotations

__all__ = ["Alignment", "AlignmentSums", "fit_alignments", "rotary_pairs"]

from dataclasses import dataclass

import numpy as np

from layerfuse.passes.share_kv.layers import KVLayer
from layerfuse.passes.share_kv.prefill import CacheRows

CONVENTIONS = ("half", "interleaved")
# Ridge of the value maps, as a share of the mean diagonal of the source's Gram matrix.
VALUE_RIDGE = 1e-3


@dataclass
class Alignment:
    """``k_target ~ key_scale * k_source`` per rotary pair, ``v_target ~ value_map @ v_source``
    per KV head; ``residual``: the share of the target's key/value energy left unexplained."""

    convention: str
    key_scale: np.ndarray  # complex [kv_heads, head_dim / 2]
    value_map: np.ndarray  # [kv_heads, head_dim, head_dim]
    key_residual: float
    value_residual: float


def rotary_pairs(head_dim: int, convention: str) -> tuple[np.ndarray, np.ndarray]:
    """The (real, imaginary) dimension indices of every rotary pair of one head."""
    half = np.arange(head_dim // 2)
    if convention == "half":
        return half, half + head_dim // 2
    return 2 * half, 2 * half + 1


class AlignmentSums:
    """Running sums of one pair's least-squares problems."""

    def __init__(self, heads: int, head_dim: int) -> None:
        self.cross = {c: np.zeros((heads, head_dim // 2), complex) for c in CONVENTIONS}
        self.source_keys = {c: np.zeros((heads, head_dim // 2)) for c in CONVENTIONS}
        self.target_keys = {c: np.zeros((heads, head_dim // 2)) for c in CONVENTIONS}
        self.value_cross = np.zeros((heads, head_dim, head_dim))
        self.value_gram = np.zeros((heads, head_dim, head_dim))
        self.target_values = 0.0

    def add(self, keys: tuple[np.ndarray, np.ndarray], values: tuple[np.ndarray, np.ndarray]):
        """``keys``/``values``: (source, target) rows ``[tokens, heads, head_dim]``."""
        for convention in CONVENTIONS:
            real, imaginary = rotary_pairs(keys[0].shape[-1], convention)
            source, target = (k[..., real] + 1j * k[..., imaginary] for k in keys)
            self.cross[convention] += (np.conj(source) * target).sum(0)
            self.source_keys[convention] += (np.abs(source) ** 2).sum(0)
            self.target_keys[convention] += (np.abs(target) ** 2).sum(0)
        source, target = values
        self.value_cross += np.einsum("thi,thj->hij", target, source)
        self.value_gram += np.einsum("thi,thj->hij", source, source)
        self.target_values += float((target**2).sum())

    def key_fit(self, convention: str) -> tuple[float, np.ndarray]:
        """(the share of the target keys' energy left, the complex scales) in ``convention``."""
        denominator = np.maximum(self.source_keys[convention], 1e-12)
        scale = self.cross[convention] / denominator
        left = self.target_keys[convention] - np.abs(self.cross[convention]) ** 2 / denominator
        return float(left.sum() / max(self.target_keys[convention].sum(), 1e-12)), scale

    def solve(self, convention: str) -> Alignment:
        key_residual, key_scale = self.key_fit(convention)
        ridge = VALUE_RIDGE * np.trace(self.value_gram, axis1=1, axis2=2) / self.value_gram.shape[1]
        identity = np.eye(self.value_gram.shape[1])
        regularised = self.value_gram + ridge[:, None, None] * identity
        value_map = np.linalg.solve(regularised, self.value_cross.transpose(0, 2, 1))
        value_map = value_map.transpose(0, 2, 1)  # N = C (G + ridge)^-1, G symmetric
        explained = np.einsum("hij,hij->", value_map, self.value_cross)
        value_residual = 1 - explained / max(self.target_values, 1e-12)
        return Alignment(convention, key_scale, value_map, key_residual, float(value_residual))


def fit_alignments(
    prefill: CacheRows, layers: list[KVLayer], pairs: list[tuple[int, int]]
) -> dict[tuple[int, int], Alignment]:
    """Each (target, source) pair's alignment, fitted on the original's keys and values of
    the calibration ``prefill``."""
    heads, head_dim = layers[pairs[0][0]].key.heads, layers[pairs[0][0]].key.head_dim
    sums = {pair: AlignmentSums(heads, head_dim) for pair in pairs}
    for batch_rows in prefill:
        rows = {name: r.astype(np.float64) for name, r in batch_rows.items()}
        for (target, source), pair_sums in sums.items():
            keys = tuple(rows[layers[i].key.present.name] for i in (source, target))
            values = tuple(rows[layers[i].value.present.name] for i in (source, target))
            pair_sums.add(keys, values)
    # One model has one rotary layout: the one that leaves less of all pairs' keys unexplained.
    convention = min(CONVENTIONS, key=lambda c: sum(x.key_fit(c)[0] for x in sums.values()))
    return {pair: pair_sums.solve(convention) for pair, pair_sums in sums.items()}
