"""The Markdown of ``benchmarks/kv_sharing.py``: quality, decode speed and memory, targets.

Kept apart from the measuring script so ``--report-only`` re-renders a committed JSON without
importing what measures it.
"""

from __future__ import annotations

from common import markdown_table

LAYERS = 30
FRACTIONS = ("1/3", "1/2")
EVAL_TOKENS = 4096
SPEED_TARGET = 1.15  # the issue's: shared KV decodes at >= 1.15x the original at context 4096
LONGEST = 4096
GIB = 2**30


def markdown(results: dict) -> str:
    rows = results["rows"]
    table = [
        [
            row["variant"],
            f"{row['layers_with_cache']}/{LAYERS}",
            f"{row['parameters'] / 1e6:.2f}M",
            f"{row['perplexity']:.1f}",
            f"{row.get('perplexity_recovered', row['perplexity']):.1f}",
        ]
        for row in rows
    ]
    headers = ["variant", "layers with a cache", "parameters", "test ppl", "after recovery"]
    kept = " Quality rows are the committed run's (`--decode-only`)." * bool(
        results.get("quality_from")
    )
    return (
        "# Cross-layer KV sharing vs attention removal (SmolLM2-135M)\n\n"
        f"Regenerate: `{results.get('command', 'python benchmarks/kv_sharing.py')}`. "
        f"Original test perplexity {rows[0]['perplexity']:.1f} on {EVAL_TOKENS} fortunes "
        f"tokens; recovery: {results['recovery_steps']} steps of 4 x 64 tokens each, same for "
        f"every variant.{kept}\n\n"
        + markdown_table(headers, table)
        + _decode_section(results)
        + _speed_verdict(results.get("decode", []), results["load_average_1m"])
        + _quality_verdict(rows)
    )


def _cases(decode: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["case"] for row in decode))


def _speed(decode: list[dict], target: str, batch: int, context: int) -> dict | None:
    found = (
        r for r in decode if (r["target"], r["batch"], r["context"]) == (target, batch, context)
    )
    return next(found, None)


def _decode_section(results: dict) -> str:
    decode, memory = results.get("decode", []), results.get("memory", [])
    loads = results["load_average_1m"]
    tiled = [r for r in decode if r.get("prefill_rows", r["batch"]) < r["batch"]]
    lines = [
        "\n## Decode speed and memory\n",
        "Decode in layerfuse's own loop (`layerfuse generate`'s), CPU, 2 threads, greedy with "
        "EOS suppressed so every row gets all its tokens; prompts are real fortunes text cut "
        "to exactly the context. tok/s is per sequence (steps after the first token per "
        "second over all steps of all repeats; the batch's throughput is batch times that). "
        "All variants run interleaved in one run, the order rotated per repeat; load average "
        f"{loads['before']:.1f} -> {loads['after']:.1f}. Only the plain "
        "variants are timed: an aligned or planned variant has the graph of the plain share "
        "at its fraction, only other weights."
        + (
            " Timings are the committed run's (`--no-decode`)."
            if results.get("decode_from")
            else ""
        ),
    ]
    if tiled:
        lines.append(
            "\n**Batch 8 is tiled:** one real prompt of the context's length is prefilled at "
            "batch 1 and its cache repeated 8 times (`DecodeCase(tiled=True)`, "
            "`Decoder.repeat_rows`), so the 8 rows hold the same prompt and decode real "
            "tokens with the shapes (and so the cost per step) of batch 8; a tiled batch "
            "decodes token for token as 8 prefilled copies do (`tests/test_decode_tiled.py`). "
            "Time to first token is not reported for those rows. A real prefill of 8 x 4096 "
            "tokens would take minutes per variant on 2 cores and hold the [8, 9, 4096, 4096] "
            "attention scores of a layer (4.8 GB)."
        )
    cases = _cases(decode)
    targets = list(dict.fromkeys(r["target"] for r in decode))
    headers = ["variant", "KV bytes/token"] + [f"tok/s {case}" for case in cases]
    headers += [f"x original, batch {b}, context {LONGEST}" for b in (1, 8)]
    table = []
    for target in targets:
        own = {r["case"]: r for r in decode if r["target"] == target}
        cells = [target, f"{next(iter(own.values()))['kv_bytes_per_token']:,}"]
        cells += [
            f"{own[case]['tokens_per_second']:.1f}" if case in own else "n/a" for case in cases
        ]
        cells += [_ratio(decode, target, batch) for batch in (1, 8)]
        table.append(cells)
    lines += ["", markdown_table(headers, table) if table else "No decode rows.\n"]
    if memory:
        lines.append(_memory_table(memory))
    return "\n".join(lines)


def _ratio(decode: list[dict], target: str, batch: int) -> str:
    mine, base = _speed(decode, target, batch, LONGEST), _speed(decode, "original", batch, LONGEST)
    if mine is None or base is None:
        return "n/a"
    return f"{mine['tokens_per_second'] / base['tokens_per_second']:.2f}x"


def _memory_table(memory: list[dict]) -> str:
    def gib(value: int | None) -> str:
        return "n/a" if value is None else f"{value / GIB:.2f}"

    table = [
        [
            row["target"],
            gib(row["cache_bytes"]),
            gib(row["prefill_peak_rss_bytes"]),
            gib(row["decode_peak_rss_bytes"]),
            gib(row["peak_rss_bytes"]),
        ]
        for row in memory
    ]
    headers = [
        "variant",
        "KV cache at the end (GiB)",
        "peak RSS to the first token (GiB)",
        "peak RSS over the decode steps (GiB)",
        "peak RSS of the process (GiB)",
    ]
    return (
        f"\nMemory at {memory[0]['case']} (tiled as above, one fresh process per variant, "
        "model files dropped from the page cache first; `layerfuse/generate/memory.py`): "
        "absolute resident set, Python, onnxruntime and the fp32 weights included. The peak to "
        "the first token is the batch-1 prefill of 4096 tokens (its logits and attention "
        "scores, which onnxruntime's arena keeps for later runs); the decode-step peak is "
        "measured from a reset of the peak once the cache is tiled (Linux `clear_refs`).\n\n"
        + markdown_table(headers, table)
    )


def _speed_verdict(decode: list[dict], loads: dict) -> str:
    """Shared KV against the original at the longest context, beside attention removal at the
    same KV bytes, with the load the timings ran under (the machine is shared)."""
    lines = [
        f"\n## Target: shared KV decodes at >= {SPEED_TARGET}x the original at context {LONGEST}\n"
    ]
    if not any(r["context"] == LONGEST for r in decode):
        return "\n".join([*lines, f"Not measured: no case at context {LONGEST} in this run.\n"])
    for fraction in FRACTIONS:
        parts = []
        for batch in (1, 8):
            ratio = _ratio(decode, f"KV shared {fraction}", batch)
            removed = _ratio(decode, f"attention removed {fraction}", batch)
            met = ratio != "n/a" and float(ratio[:-1]) >= SPEED_TARGET
            verdict = "met" if met else "**not met**"
            parts.append(f"batch {batch}: {ratio} ({verdict}; attention removed: {removed})")
        lines.append(f"- KV shared {fraction}: " + "; ".join(parts) + ".")
    lines.append(
        "\nA layer that reads its partner's cache still attends over it (the same reads and "
        "arithmetic per step as before); what it saves per step is its key and value "
        "projections and the copy of its own cache that the graph's Concat makes on every "
        "step. Removal drops the whole attention block, hence faster still at the same KV "
        "bytes. The timings ran on a 2-core machine shared with other jobs (load average "
        f"{loads['before']:.1f} -> {loads['after']:.1f}); interleaving spreads that load over "
        "all variants, but a single ratio stays noisy (compare the ratios at context 1024 "
        "with those at 4096), so a margin of a few percent around the target is unsettled.\n"
    )
    return "\n".join(lines)


def _quality_verdict(rows: list[dict]) -> str:
    """The issue's target, checked: at the same KV bytes and the same training, the best
    shared variant has the lower perplexity after recovery."""
    lines = ["\n## Target: shared KV beats attention removal at the same KV bytes\n"]
    for fraction in FRACTIONS:
        shared = [r for r in rows if r["variant"].startswith("KV") and fraction in r["variant"]]
        best = min(shared, key=lambda r: r["perplexity_recovered"])
        removed = next(r for r in rows if r["variant"] == f"attention removed {fraction}")
        verdict = (
            "met"
            if best["perplexity_recovered"] < removed["perplexity_recovered"]
            else "**not met**"
        )
        lines.append(
            f"- {fraction} of the layers: best shared ({best['variant']}) "
            f"{best['perplexity_recovered']:.1f} vs removed {removed['perplexity_recovered']:.1f} "
            f"after the same recovery: {verdict}."
        )
    lines.append(
        "\nSharing is applied to a model trained without it. *Adjacent* pairs (Cross-Layer "
        "Attention's layout) as they are make the target layers attend with keys in another "
        "layer's basis: perplexity explodes. *Aligned* pairs fit, per KV head, the rotary-"
        "commuting complex scale of the keys and a linear map of the values on calibration "
        "text and fold them into the target's query and output projections "
        "(`layerfuse/passes/share_kv/align.py`; same graph, same cache, no cost per token). "
        "*Planned* pairs are the planner's: each layer with its most similar earlier one, "
        "ranked by validation perplexity. Aligned planned pairs start below attention "
        "removal at both fractions; the same short recovery then favours removal, which "
        "leaves the residual stream intact and trains 7-10M fewer parameters.\n"
    )
    return "\n".join(lines)
