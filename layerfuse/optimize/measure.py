"""Measure the original and every finalist side by side, from the files as written.

Latency comes from :func:`layerfuse.runtime.bench.run_bench` (all sessions built, every graph
run once per repetition in a rotating order, so load lands on all alike) at the named shape;
parameters, weight bytes and file bytes from the files; quality from
:func:`layerfuse.runtime.evaluate.evaluate_model` on the test split (perplexity, or topic
accuracy for text encoders), which no stage before this one has read.
"""

from __future__ import annotations

__all__ = ["measure_models"]

from pathlib import Path

from layerfuse.progress import Reporter
from layerfuse.runtime.bench import BenchConfig, run_bench
from layerfuse.runtime.evaluate import evaluate_model
from layerfuse.runtime.inputs import parse_shapes


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
    """``{name: {quality, parameters, weight_bytes, file_bytes, latency_ms, speedup}}``;
    the first model is the reference of the speed-ups."""
    names = list(models)
    config = BenchConfig(
        shapes=parse_shapes(measure["shape"]),
        provider=provider,
        runs=measure["latency_runs"],
        memory=False,
    )
    reporter.step(f"timing {len(names)} graphs side by side at {measure['shape']}")
    document = run_bench([models[n] for n in names], config, names=names, reporter=reporter)
    shape = str(config.shapes[0])
    results = {}
    for graph in document["graphs"]:
        results[graph["name"]] = {
            "parameters": graph["stats"]["parameters"],
            "weight_bytes": graph["stats"]["initializer_bytes"],
            "file_bytes": graph["stats"]["file_bytes"],
            "latency_ms": graph["latency"][shape]["p50_ms"],
            "speedup": graph["ratios"]["speedup"][shape],
            "tokens_per_second": graph["tokens_per_second"][shape],
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
