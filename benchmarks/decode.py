"""Decode benchmark (issue 14): SmolLM2-135M generating with a KV cache, against onnxruntime-genai.

The peer is what onnxruntime users deploy: the onnxruntime-genai model builder's fp32 graph of
the original (GroupQueryAttention, fused residual norms), run by onnxruntime-genai's own
generator. The variants are layerfuse rewrites of that same builder graph, so a ratio to the
peer isolates the rewrite; they run in onnxruntime-genai too (their folders keep a matching
``genai_config.json``) and, for the original and the fused model, in layerfuse's own decode
loop. ``layerfuse export --kv-cache`` of the packaged model (torch dynamo, plain ops) runs in
layerfuse's loop. Plans, as in serve_load.py and ffn_fusion.py (no calibration data needed):

- ``merged 1/3``: the FFs of blocks 19-29 averaged into one shared weight set (10 of 30 FFs);
- ``attention-removed``: the attention sublayers of blocks 4-9 removed (and their cache);
- ``fused``: those removed, and the FFNs of blocks 3-8 fused into one wide FFN (ffn_fusion's plan);
- ``merged 1/3 + fused``: both rewrites in one graph (the windows do not overlap).

Measured interleaved in one run by :mod:`layerfuse.generate.timing`; quality is not measured.

    python benchmarks/decode.py                 # about 12 minutes on 2 shared cores
    python benchmarks/decode.py --report-only   # the report again from the saved measurements
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import numpy as np
from common import RESULTS, WORK, log, markdown_table, write_results

from layerfuse.data import corpus
from layerfuse.data.tokens import load_tokenizer
from layerfuse.files import write_json_atomic
from layerfuse.generate.timing import DecodeCase, DecodeTarget, decode_prompts, run_decode_bench
from layerfuse.model.io import load_model, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.detect import detect_structure
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.prune import PrunePlan

MODEL = "smollm2-135m"
ROOT = WORK / "decode"
CASES = (
    DecodeCase(batch=1, context=128, new_tokens=24, repeats=6),
    DecodeCase(batch=8, context=128, new_tokens=16, repeats=2),
    DecodeCase(batch=1, context=1024, new_tokens=8, repeats=2),
    DecodeCase(batch=8, context=1024, new_tokens=6, repeats=1),
)
PEER = "genai builder graph (peer)"


@functools.cache
def packaged_source():
    from layerfuse.export.sources import load_source

    log(f"loading {MODEL}")
    return load_source(MODEL)


def builder_graph() -> Path:
    from layerfuse.export.genai_builder import build_genai_folder, save_hf_folder

    out = ROOT / "genai-original"
    if not (out / "model.onnx").exists():
        if not (ROOT / "hf" / "config.json").exists():
            save_hf_folder(packaged_source(), ROOT / "hf")
        log("building the onnxruntime-genai graph")
        build_genai_folder(ROOT / "hf", out)
    return out / "model.onnx"


def exported_graph() -> Path:
    from layerfuse.export.onnx_export import export_model

    path = ROOT / "export-original" / "model.onnx"
    if not path.exists():
        log("exporting with a KV cache")
        export_model(packaged_source(), path.parent, kv_cache=True)
    return path


def fuse_plan(base: Path, fuse: bool = True) -> FusePlan | PrunePlan:
    """ffn_fusion.py's plan: attention of blocks 4-9 removed, FFNs of blocks 3-8 fused."""
    structure = detect_structure(load_model(base))
    known = (structure.fingerprint, len(structure.blocks))
    if not fuse:
        return PrunePlan(*known, "attention", list(range(4, 10)))
    return FusePlan(*known, list(range(4, 10)), [(3, 8)])


# name -> (the variant it rewrites, None for the original; its plan for that graph)
RECIPES = {
    "merged 1/3": (
        None,
        lambda base: plan_merge(base, MergeRequest(ranges=[(19, 29)], method="vanilla")),
    ),
    "attention-removed": (None, functools.partial(fuse_plan, fuse=False)),
    "fused": (None, fuse_plan),
    "merged 1/3 + fused": ("merged 1/3", fuse_plan),
}
OPTIMIZED = tuple(RECIPES)


def variants(original: Path) -> dict[str, Path]:
    paths = {}
    for name, (base_name, plan) in RECIPES.items():
        base = paths[base_name] if base_name else original
        paths[name] = (
            ROOT / name.replace(" + ", "+").replace(" ", "-").replace("/", "_") / "model.onnx"
        )
        if not paths[name].exists():
            log(f"building {name}")
            save_model(apply_plan(base, plan(base)), paths[name])
            carry_manifest(base, paths[name])
    return paths


def targets() -> list[DecodeTarget]:
    builder, exported = builder_graph(), exported_graph()
    rewritten = variants(builder)
    return [
        DecodeTarget(PEER, builder, "genai"),
        DecodeTarget("original (builder graph, layerfuse loop)", builder),
        DecodeTarget("original (layerfuse export --kv-cache)", exported),
        *(DecodeTarget(name, path, "genai") for name, path in rewritten.items()),
        DecodeTarget("fused (layerfuse loop)", rewritten["fused"]),
    ]


def with_ratios(rows: list[dict]) -> list[dict]:
    """Each row's decode speed and time to first token as a ratio to the peer's (>1: faster)."""
    peers = {row["case"]: row for row in rows if row["target"] == PEER}
    for row in rows:
        peer = peers[row["case"]]
        row["speed_vs_peer"] = row["tokens_per_second"] / peer["tokens_per_second"]
        row["ttft_vs_peer"] = peer["time_to_first_token_s"] / row["time_to_first_token_s"]
        row["kv_vs_peer"] = row["kv_bytes_per_token"] / peer["kv_bytes_per_token"]
        row["token_timings"] = row["repeats"] * (row["new_tokens"] - 1)
    return rows


def verdict(rows: list[dict]) -> dict:
    """The best optimized variant at batch 1 per context, against the 1.25x target."""
    best = {}
    for row in rows:
        if row["batch"] != 1 or not row["target"].startswith(OPTIMIZED):
            continue
        if row["speed_vs_peer"] > best.get(row["context"], {}).get("speed_vs_peer", 0):
            best[row["context"]] = row
    return {
        context: {
            "target": row["target"],
            "speed_vs_peer": row["speed_vs_peer"],
            "token_timings": row["token_timings"],
            "meets_1_25x": row["speed_vs_peer"] >= 1.25,
        }
        for context, row in best.items()
    }


HEADERS = (
    "target|runtime|first token ms|tokens/s per sequence|tokens/s batch|p50 ms|p90 ms|"
    "KV bytes/token|speed vs peer|timings|tokens = peer"
).split("|")


def markdown(rows: list[dict], best: dict, loads: dict) -> str:
    parts = [
        f"# {MODEL}: decoding with a KV cache, every variant against onnxruntime-genai\n\n",
        "The peer is the onnxruntime-genai builder's fp32 graph of the original, run by "
        "onnxruntime-genai 0.18; variants are layerfuse rewrites of that graph (see "
        "benchmarks/decode.py). 2 intra-op threads, CPU, EOS suppressed, prompts of real text; "
        f"machine load average {loads['before']:.1f} before and {loads['after']:.1f} after "
        "the measurements (2 cores shared with other jobs: ratios measured side by side are "
        "the numbers to read, absolute speeds are not). Speed is decode steps after the "
        "first token; `timings` is how many per-token timings each ratio rests on: cases "
        "with one or two runs swing by tens of percent under this load, so the case with the "
        "most timings is the one to trust. `tokens = peer`: new tokens equal to the peer's "
        "(the variants are untrained rewrites; their quality is in ffn_fusion_cpu.md and "
        "merge_quality.md).\n\n",
    ]
    for context, entry in sorted(best.items()):
        met = "meets" if entry["meets_1_25x"] else "misses"
        parts.append(
            f"- batch 1, context {context}: best optimized is **{entry['target']}** at "
            f"**{entry['speed_vs_peer']:.2f}x** the peer's tokens/s ({met} the 1.25x target; "
            f"{entry['token_timings']} per-token timings per target)\n"
        )
    for case in dict.fromkeys(row["case"] for row in rows):
        own = [row for row in rows if row["case"] == case]
        parts.append(
            f"\n## {case} ({own[0]['new_tokens']} new tokens, runs: {own[0]['repeats']})\n\n"
        )
        table = [
            [
                row["target"],
                row["runtime"],
                f"{row['time_to_first_token_s'] * 1000:.0f}",
                f"{row['tokens_per_second']:.1f}",
                f"{row['batch_tokens_per_second']:.1f}",
                f"{row['p50_token_ms']:.1f}",
                f"{row['p90_token_ms']:.1f}",
                row["kv_bytes_per_token"],
                f"{row['speed_vs_peer']:.2f}x",
                row["token_timings"],
                f"{row['tokens_equal_to_peer']:.0%}",
            ]
            for row in own
        ]
        parts.append(markdown_table(HEADERS, table))
    parts.append("\n![decode speed against the peer](decode.png)\n")
    return "".join(parts)


def figure(rows: list[dict]) -> None:
    """Grouped bars: decode speed relative to the peer, one group per case."""
    from layerfuse.reports.plots import pyplot, save_figure

    plt = pyplot()
    cases = list(dict.fromkeys(row["case"] for row in rows))
    names = list(dict.fromkeys(row["target"] for row in rows))
    figure, axis = plt.subplots(figsize=(12, 4.8))
    width = 0.85 / len(names)
    for index, name in enumerate(names):
        values = [
            next(r["speed_vs_peer"] for r in rows if r["target"] == name and r["case"] == c)
            for c in cases
        ]
        axis.bar(
            np.arange(len(cases)) + (index - (len(names) - 1) / 2) * width,
            values,
            width,
            label=name,
        )
    axis.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axis.axhline(1.25, color="tab:red", linestyle=":", linewidth=1, label="target 1.25x")
    axis.set_xticks(np.arange(len(cases)), cases)
    axis.set_ylabel("decode tokens/s / peer's")
    axis.set_title(f"{MODEL}: decode speed relative to onnxruntime-genai on its builder graph")
    axis.grid(axis="y", alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    save_figure(figure, RESULTS / "decode.png")


def measure() -> tuple[list[dict], dict]:
    chosen = targets()
    tokenizer = load_tokenizer(chosen[0].path.parent)
    texts = corpus.split_texts("test")
    loads = {"before": os.getloadavg()[0]}
    rows = run_decode_bench(
        chosen,
        CASES,
        lambda case: decode_prompts(tokenizer, texts, case.batch, case.context),
        provider="cpu",
        threads=2,
        log=log,
    )
    loads["after"] = os.getloadavg()[0]
    write_json_atomic(ROOT / "rows.json", {"rows": rows, "load_average_1m": loads})
    return rows, loads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--report-only",
        action="store_true",
        help=f"rewrite the results from the last run's measurements ({ROOT / 'rows.json'})",
    )
    if parser.parse_args().report_only:
        saved = json.loads((ROOT / "rows.json").read_text())
        rows, loads = saved["rows"], saved["load_average_1m"]
        # The results record the command that measured them, not this re-rendering.
        sys.argv = sys.argv[:1]
    else:
        rows, loads = measure()
    rows = with_ratios(rows)
    best = verdict(rows)
    figure(rows)
    import onnxruntime_genai

    results = {
        "model": MODEL,
        "peer": PEER,
        "onnxruntime_genai": onnxruntime_genai.__version__,
        "threads": 2,
        "load_average_1m": loads,
        "best_at_batch_1": best,
        "rows": rows,
    }
    write_results("decode", results, markdown(rows, best, loads))


if __name__ == "__main__":
    main()
