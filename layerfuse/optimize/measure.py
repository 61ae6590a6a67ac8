"""Measure the original and every finalist side by side, from the files as written.

Latency comes from :func:`layerfuse.runtime.bench.run_bench` (all sessions built, every graph
run once per repetition in a rotating order, so load lands on all alike) at the named shape,
with each graph's resident memory measured in a fresh process; decode speed, for a causal LM
exported with a KV cache, from :func:`layerfuse.generate.timing.run_decode_bench` (real text
prompts, every graph in turn); parameters, weight bytes and file bytes from the files;
quality from :func:`layerfuse.runtime.evaluate.evaluate_model` on the test split (perplexity,
or topic accuracy for text encoders), which no stage before this one has read.
"""

from __future__ import annotations

__all__ = ["decode_speeds", "measure_models"]

from pathlib import Path

import onnx
import onnx_ir as ir

from layerfuse.errors import DataError
from layerfuse.model.cache import paired_cache
from layerfuse.progress import Reporter
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.evaluate import evaluate_model
from layerfuse.runtime.inputs import parse_shapes


def _has_cache(path: Path) -> bool:
    graph = ir.serde.deserialize_model(onnx.load(path, load_external_data=False)).graph
    try:
        return bool(paired_cache(graph, str(path)))
    except DataError:  # a cache that cannot be carried from step to step: no decoding
        return False


def decode_speeds(
    models: dict[str, Path], decode: dict, provider: str, reporter: Reporter
) -> dict[str, float]:
    """Decode tokens/s per sequence of every model at ``decode``'s batch, context and new
    tokens; empty when the first model has no KV cache (nothing to decode step by step)."""
    first = next(iter(models.values()))
    if not decode["new_tokens"] or not _has_cache(first):
        return {}
    from layerfuse.data.corpus import split_texts
    from layerfuse.data.tokens import load_tokenizer
    from layerfuse.generate.timing import DecodeCase, DecodeTarget, decode_prompts, run_decode_bench
    from layerfuse.model.manifest import require_manifest

    tokenizer = load_tokenizer(first.parent / require_manifest(first).tokenizer)
    texts = split_texts("test")
    case = DecodeCase(decode["batch"], decode["context"], decode["new_tokens"], decode["repeats"])
    reporter.step(f"decoding with every graph: {case.label}, {case.new_tokens} new tokens")
    rows = run_decode_bench(
        [DecodeTarget(name, path) for name, path in models.items()],
        [case],
        lambda c: decode_prompts(tokenizer, texts, c.batch, c.context),
        provider="cpu" if provider == "auto" else provider,
    )
    return {row["target"]: row["tokens_per_second"] for row in rows}


def measure_models(
    models: dict[str, Path],
    *,
    metric: str,
    data: str,
    measure: dict,
    seq_len: int,
    provider: str,
    reporter: Reporter,
) -> dict[str, dict]:
    """``{name: {quality, parameters, weight_bytes, file_bytes, latency_ms, speedup,
    memory_bytes, decode_tokens_per_second}}``; the first model is the reference of the
    speed-ups. Decode speed is None where the graphs have no KV cache."""
    names = list(models)
    config = BenchConfig(
        shapes=parse_shapes(measure["shape"]),
        provider=provider,
        runs=measure["latency_runs"],
        memory=measure["memory"],
    )
    reporter.step(f"timing {len(names)} graphs side by side at {measure['shape']}")
    document = run_bench([models[n] for n in names], config, names=names, reporter=reporter)
    shape = str(config.shapes[0])
    decoding = decode_speeds(models, measure["decode"], provider, reporter)
    results = {}
    for graph in document["graphs"]:
        memory = graph.get("memory")
        results[graph["name"]] = {
            "parameters": graph["stats"]["parameters"],
            "weight_bytes": graph["stats"]["initializer_bytes"],
            "file_bytes": graph["stats"]["file_bytes"],
            "latency_ms": graph["latency"][shape]["p50_ms"],
            "speedup": graph["ratios"]["speedup"][shape],
            "tokens_per_second": graph["tokens_per_second"][shape],
            "memory_bytes": None if memory is None else memory["after_run_bytes"],
            "decode_tokens_per_second": decoding.get(graph["name"]),
        }
    for name in reporter.track(names, len(names), "test quality"):
        evaluation = evaluate_model(
            models[name],
            data=data,
            tokens=measure["test_tokens"],
            seq_len=seq_len,
            provider=provider,
            latency_runs=1,
        )
        results[name]["quality"] = evaluation[metric]
        results[name]["path"] = str(models[name])
    return results
