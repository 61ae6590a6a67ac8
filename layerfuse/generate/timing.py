"""Decode benchmarks: generation timed the way users run it, every target in one run.

A target is a graph and the runtime that runs it: layerfuse's decode loop (``ort``, the loop
``layerfuse generate`` uses) or onnxruntime-genai's generator (``genai``). Every case (batch,
context, new tokens) runs on every target in turn, repeat after repeat with the order rotated,
so load from other processes falls on all of them alike. Prompts are real text cut to exactly
``context`` tokens per row, so no row is padded and both runtimes see the same tokens, and EOS
is suppressed, so every row gets exactly the asked number of new tokens.

A case may be ``tiled``: one prompt of ``context`` tokens is prefilled and its cache repeated
``batch`` times (:meth:`Decoder.repeat_rows`), so the batch decodes ``batch`` rows holding the
same real prompt. A decode step's cost depends only on the shapes, which are those of the
batch, while a real prefill of 8 x 4096 tokens would take minutes on a small CPU and hold the
``[batch, heads, context, context]`` attention scores of every layer; the time to first token
of a tiled case is that of the one-row prefill, so it is not reported (None).

Reported per target and case: time to first token (prefill and the first choice; median over
repeats), decode speed (steps after the first token per second, per sequence and for the
whole batch), per-token latency percentiles pooled over repeats, the cache bytes one token
adds (from the graph), and how many new tokens equal the first target's (the peer): 1.0 for a
graph that computes the same function, lower for a rewritten one.
"""

from __future__ import annotations

__all__ = ["DecodeCase", "DecodeTarget", "decode_prompts", "run_decode_bench"]

import gc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from layerfuse.errors import DataError
from layerfuse.generate.decoder import Decoder
from layerfuse.generate.loop import Generation, generate_ids, token_ids
from layerfuse.model.cache import kv_bytes_per_token, paired_cache

RUNTIMES = ("ort", "genai")


@dataclass(frozen=True)
class DecodeCase:
    """``batch`` prompts of ``context`` tokens each, continued by ``new_tokens`` tokens; with
    ``tiled``, one prompt prefilled and its cache repeated ``batch`` times."""

    batch: int
    context: int
    new_tokens: int
    repeats: int = 1
    tiled: bool = False

    @property
    def label(self) -> str:
        return f"batch {self.batch}, context {self.context}"

    @property
    def prefill_rows(self) -> int:
        return 1 if self.tiled else self.batch


@dataclass(frozen=True)
class DecodeTarget:
    name: str
    path: Path
    runtime: str = "ort"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise DataError(f"unknown runtime '{self.runtime}' (choose from ort, genai)")


def decode_prompts(tokenizer, texts: Sequence[str], batch: int, context: int) -> list[list[int]]:
    """``batch`` rows of exactly ``context`` tokens: consecutive stretches of ``texts``."""
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text)["input_ids"]
        if len(stream) >= batch * context:
            return [stream[row * context : (row + 1) * context] for row in range(batch)]
    raise DataError(f"the texts hold {len(stream)} tokens; {batch} x {context} are needed")


Runner = Callable[[list[list[int]], int, int], Generation]


def _open(target: DecodeTarget, provider: str, threads: int | None) -> Runner:
    """A function of (prompts, new tokens, copies of each prompt) that generates with the
    target, its session(s) built now."""
    if target.runtime == "genai":
        from layerfuse.generate.genai import GenaiGenerator

        generator = GenaiGenerator(target.path.parent, provider=provider, threads=threads)

        def genai(prompts: list[list[int]], count: int, copies: int) -> Generation:
            if copies != 1:
                raise DataError("onnxruntime-genai cannot repeat a prefilled cache: no tiled case")
            return generator.generate_ids(prompts, max_new_tokens=count, suppress_eos=True)

        return genai
    decoder = Decoder(target.path, provider=provider, threads=threads)
    eos = token_ids(decoder.manifest.generation.get("eos_token_id"))
    return lambda prompts, count, copies: generate_ids(
        decoder, prompts, max_new_tokens=count, eos_token_ids=eos, suppress_eos=True, copies=copies
    )


def _kv_bytes(path: Path) -> int:
    graph = ir.serde.deserialize_model(onnx.load(path, load_external_data=False)).graph
    return kv_bytes_per_token(paired_cache(graph, str(path)))


def _summary(case: DecodeCase, runs: list[Generation], peer: list[list[int]]) -> dict:
    steps = np.array([s for run in runs for s in run.step_seconds])
    per_sequence = len(steps) / steps.sum() if len(steps) else float("nan")
    pairs = [
        (mine, theirs)
        for row, peer_row in zip(runs[0].tokens, peer, strict=True)
        for mine, theirs in zip(row, peer_row, strict=False)
    ]
    agreement = sum(mine == theirs for mine, theirs in pairs) / max(len(pairs), 1)
    first_token = [run.time_to_first_token for run in runs]
    return {
        "case": case.label,
        "batch": case.batch,
        "context": case.context,
        "new_tokens": case.new_tokens,
        "repeats": len(runs),
        "prefill_rows": case.prefill_rows,
        "time_to_first_token_s": None if case.tiled else float(np.median(first_token)),
        "tokens_per_second": float(per_sequence),
        "batch_tokens_per_second": float(per_sequence * case.batch),
        "p50_token_ms": float(np.percentile(steps, 50) * 1000),
        "p90_token_ms": float(np.percentile(steps, 90) * 1000),
        "tokens_equal_to_peer": agreement,
    }


def run_decode_bench(
    targets: Sequence[DecodeTarget],
    cases: Sequence[DecodeCase],
    prompts: Callable[[DecodeCase], list[list[int]]],
    *,
    provider: str = "cpu",
    threads: int | None = None,
    open_together: int = 1024,
    log: Callable[[str], None] = lambda _message: None,
) -> list[dict]:
    """One row per target and case (the first target is the peer the others are compared to).

    Sessions keep the buffers of their largest run (a prefill of 8 x 1024 tokens holds 1.6 GB
    of SmolLM2 logits alone), so for a case of more than ``open_together`` prompt tokens only
    one target is open at a time: each run opens its target, warms it up with one short
    generation and closes it. Smaller cases open every target once, warm them up and then
    interleave all repeats, which keeps the rounds short and close together in time. A tiled
    case prefills ``context`` tokens; ``prompts`` is asked for its one row as a batch-1 case.
    """
    warmup = prompts(DecodeCase(1, 16, 4))[:1]

    def opened(target: DecodeTarget) -> Runner:
        runner = _open(target, provider, threads)
        runner(warmup, 4, 1)
        return runner

    runs: dict[tuple[str, str], list[Generation]] = {}
    for case in cases:
        rows = prompts(DecodeCase(1, case.context, case.new_tokens) if case.tiled else case)
        copies = case.batch if case.tiled else 1
        together = case.prefill_rows * case.context <= open_together
        log(f"{case.label}: {'all targets open' if together else 'one target open at a time'}")
        runners = {target.name: opened(target) for target in targets} if together else {}
        for repeat in range(case.repeats):
            shift = repeat % len(targets)
            for target in [*targets[shift:], *targets[:shift]]:
                log(f"{case.label}, repeat {repeat + 1}/{case.repeats}: {target.name}")
                runner = runners.get(target.name) or opened(target)
                runs.setdefault((target.name, case.label), []).append(
                    runner(rows, case.new_tokens, copies)
                )
                del runner
                gc.collect()
        runners.clear()
        gc.collect()
    table = []
    for case in cases:
        peer = runs[(targets[0].name, case.label)][0].tokens
        for target in targets:
            row = {"target": target.name, "runtime": target.runtime, "path": str(target.path)}
            row.update(_summary(case, runs[(target.name, case.label)], peer))
            row["kv_bytes_per_token"] = _kv_bytes(target.path)
            table.append(row)
    return table
