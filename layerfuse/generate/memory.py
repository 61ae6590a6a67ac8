"""Resident memory of decoding, measured in a fresh process per graph.

What a decoding process holds is the weights, the cache (which grows with batch x context)
and what onnxruntime keeps of its largest run. Several graphs in one process would mix in
the allocator's leftovers of the previous one, so each is measured in a child of its own
(:func:`layerfuse.runtime.measure.run_probe`), from a cold page cache, with the RSS helpers
the session memory figures use. The child generates as the decode benchmark does (EOS
suppressed, so every row gets all its tokens; ``copies`` repeats each prompt's prefilled
cache as a tiled case does) and reports its peak RSS over the whole run and, apart, over
the decode steps alone (the peak is reset once the first token is chosen, where Linux
allows it), since a prefill's activations can outweigh the cache at batch 1.
"""

from __future__ import annotations

__all__ = ["decode_memory"]

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from layerfuse.generate.decoder import Decoder
from layerfuse.generate.loop import generate_ids, token_ids
from layerfuse.model.publish import model_files
from layerfuse.runtime.measure import (
    evict_from_page_cache,
    peak_rss_bytes,
    reset_peak_rss,
    rss_bytes,
    run_probe,
)


def _probe(model_path: str, prompts_path: str, new_tokens: str, copies: str, threads: str) -> dict:
    """Child-process side of :func:`decode_memory`."""
    prompts = json.loads(Path(prompts_path).read_text())
    evict_from_page_cache(model_files(model_path))
    before = rss_bytes()
    decoder = Decoder(model_path, provider="cpu", threads=int(threads) or None)
    loaded = rss_bytes()
    marks: dict[str, int | None] = {}

    def first_token(_tokens: np.ndarray) -> None:
        if not marks:
            marks["prefill_peak"] = peak_rss_bytes()
            marks["decode_start"] = rss_bytes()
            marks["reset"] = int(reset_peak_rss())

    generation = generate_ids(
        decoder,
        prompts,
        max_new_tokens=int(new_tokens),
        eos_token_ids=token_ids(decoder.manifest.generation.get("eos_token_id")),
        suppress_eos=True,
        on_token=first_token,
        copies=int(copies),
    )
    end = peak_rss_bytes()
    peaks = [peak for peak in (marks["prefill_peak"], end) if peak is not None]
    return {
        "rss_before_bytes": before,
        "load_bytes": loaded - before,
        "peak_rss_bytes": max(peaks, default=None),
        "prefill_peak_rss_bytes": marks["prefill_peak"],
        "decode_start_rss_bytes": marks["decode_start"],
        "decode_peak_rss_bytes": end if marks["reset"] else None,
        "cache_bytes": generation.cache_bytes,
        "rows": len(generation.tokens),
    }


def decode_memory(
    model_path: str | os.PathLike,
    prompts: list[list[int]],
    *,
    new_tokens: int,
    copies: int = 1,
    threads: int | None = None,
) -> dict:
    """Absolute RSS figures (bytes) of a fresh process that loads ``model_path`` and continues
    ``prompts`` (each repeated ``copies`` times after its prefill) by ``new_tokens`` tokens:
    ``peak_rss_bytes`` over the whole run, ``decode_peak_rss_bytes`` over the decode steps
    (None where the peak cannot be reset), ``prefill_peak_rss_bytes`` up to the first token,
    the RSS before the session existed, what loading added, and the final cache's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        prompts_path = Path(tmp) / "prompts.json"
        prompts_path.write_text(json.dumps(prompts))
        arguments = [str(model_path), str(prompts_path), str(new_tokens), str(copies)]
        arguments.append(str(threads or 0))
        return run_probe("layerfuse.generate.memory", arguments, str(model_path))


if __name__ == "__main__":
    print(json.dumps(_probe(*sys.argv[1:6])))
