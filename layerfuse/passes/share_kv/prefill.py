"""The calibration prefill both halves of share-kv planning read: every layer's keys and
values, one empty-cache prefill per batch, run once and kept as token rows."""

from __future__ import annotations

__all__ = ["CacheRows", "cache_rows", "token_rows"]

import numpy as np

from layerfuse.passes.share_kv.layers import KVLayer
from layerfuse.runtime.calibration import adapt_feeds
from layerfuse.runtime.session import create_session

# Per batch: a cache output's name -> its real tokens' rows, [tokens, heads, dim].
CacheRows = list[dict[str, np.ndarray]]


def token_rows(array: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """A cache tensor [batch, heads, seq, dim] -> its real tokens' rows, [tokens, heads, dim]."""
    return array.transpose(0, 2, 1, 3)[mask.astype(bool)]


def cache_rows(model_path, layers: list[KVLayer], batches, provider: str) -> CacheRows:
    """The keys and values of ``layers`` over ``batches``; small next to the model (a few
    MB per thousand calibration tokens and layer), so similarity and alignment share them
    instead of each running the prefill."""
    session = create_session(model_path, provider=provider)
    wanted = [entry.present.name for layer in layers for entry in layer.entries]
    rows = []
    for batch in batches:
        outputs = session.run(wanted, adapt_feeds(session, batch.feeds))
        mask = batch.mask if batch.mask is not None else np.ones(outputs[0].shape[::2][:2])
        rows.append({n: token_rows(a, mask) for n, a in zip(wanted, outputs, strict=True)})
    return rows
