"""The decode loop: prefill once, then one token per step, timed step by step.

The same loop serves ``layerfuse generate`` and the decode benchmark, so what the benchmark
times is what users run: the time to the first token (prefill plus choosing the token) and
each later step (one run of the graph on one new token per row, plus choosing it).
"""

from __future__ import annotations

__all__ = ["Generation", "check_context", "generate_ids", "token_ids"]

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from layerfuse.errors import DataError, LayerfuseError
from layerfuse.generate.decoder import Decoder, pad_prompts
from layerfuse.generate.sampling import GREEDY, Sampler, Sampling


@dataclass
class Generation:
    """New tokens per row and how long they took."""

    tokens: list[list[int]]
    prompt_lengths: list[int]
    time_to_first_token: float
    step_seconds: list[float] = field(default_factory=list)
    cache_bytes: int = 0

    @property
    def tokens_per_second(self) -> float:
        """Decode speed of one sequence: steps after the first token per second."""
        return len(self.step_seconds) / max(sum(self.step_seconds), 1e-12)

    def record(self, tokens: np.ndarray, finished: np.ndarray, eos, on_token) -> bool:
        """Keep one step's tokens of the rows still running, stream them, and mark the rows
        that reached EOS in ``finished`` (in place); True once every row has finished."""
        for row in np.flatnonzero(~finished):
            self.tokens[row].append(int(tokens[row]))
        if on_token is not None:
            on_token(tokens)
        finished |= np.isin(tokens, eos)
        return bool(finished.all())


def token_ids(value) -> list[int]:
    """A token id or a list of them (configs write both) as a list."""
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def check_context(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: int | None):
    """One clear line when the request cannot fit the model."""
    if max_new_tokens < 1:
        raise LayerfuseError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")
    if not prompts or min(len(p) for p in prompts) == 0:
        raise DataError("the prompt is empty: give at least one token to continue")
    longest = max(len(p) for p in prompts)
    if context is not None and longest + max_new_tokens > context:
        raise DataError(
            f"the prompt has {longest} tokens and {max_new_tokens} new ones were asked for, "
            f"but the model's context is {context} tokens"
        )


def generate_ids(
    decoder: Decoder,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = GREEDY,
    eos_token_ids: Sequence[int] = (),
    suppress_eos: bool = False,
    on_token: Callable[[np.ndarray], None] | None = None,
    copies: int = 1,
) -> Generation:
    """Continue every prompt by up to ``max_new_tokens`` tokens.

    A row stops at an EOS token (later tokens of a finished row are EOS again and dropped);
    with ``suppress_eos`` EOS is never chosen, so every row gets exactly ``max_new_tokens``
    (Hugging Face's ``min_new_tokens``; what benchmarks need). ``on_token`` sees each step's
    tokens as they are chosen. With ``copies`` each prompt is prefilled once and its cache
    repeated into ``copies`` consecutive rows (:meth:`Decoder.repeat_rows`), which decode as
    that many rows holding the same prompt would, at the cost of one prefill; the time to
    the first token is then that of the one-row prefill.
    """
    if copies < 1:
        raise LayerfuseError(f"copies must be at least 1, got {copies}")
    check_context(prompts, max_new_tokens, decoder.context_length)
    eos = list(eos_token_ids)
    pad = eos[0] if eos else 0
    ids, mask = pad_prompts([list(p) for p in prompts], decoder.padding, pad)
    sampler = Sampler(sampling)

    def choose(logits: np.ndarray) -> np.ndarray:
        if suppress_eos and eos:
            logits = logits.copy()
            logits[:, eos] = -np.inf
        return sampler(logits)

    started = time.perf_counter()
    logits = decoder.start(ids, mask)
    if copies > 1:
        decoder.repeat_rows(copies)
        logits = np.repeat(logits, copies, axis=0)
    tokens = choose(logits)
    lengths = [len(p) for p in prompts for _ in range(copies)]
    result = Generation([[] for _ in lengths], lengths, 0.0)
    result.time_to_first_token = time.perf_counter() - started
    finished = np.zeros(len(lengths), dtype=bool)
    for step in range(max_new_tokens):
        if step:
            began = time.perf_counter()
            tokens = np.where(finished, pad, choose(decoder.step(tokens)))
            result.step_seconds.append(time.perf_counter() - began)
        if result.record(tokens, finished, eos, on_token):
            break
    result.cache_bytes = decoder.cache_bytes()
    return result
