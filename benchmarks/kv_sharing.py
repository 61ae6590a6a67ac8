"""Cross-layer KV sharing against attention removal at the same KV bytes per token.

    python benchmarks/kv_sharing.py [--steps 16]

SmolLM2-135M exported with a KV cache; KV shared in 1/3 and 1/2 of its 30 layers (adjacent
pairs, Cross-Layer Attention's layout: layer 3k+1 reads layer 3k, or 2k+1 reads 2k), and the
attention of as many layers removed instead (chosen by block influence, ``prune --target
attention``), which leaves the same KV bytes per token. Each is measured before and after the
same recovery budget (``layerfuse recover``, KD on the fortunes train split): test perplexity,
KV bytes per token read from the graph's cache inputs, decode speed in layerfuse's loop at
contexts 128, 1024 and 4096, batch 1 and 8 (batch 8 tiled: one real prompt prefilled, its
cache repeated 8 times), all plain variants interleaved in one run, and the resident memory
of decoding at 8 x 4096 in a fresh process per variant. Writes
``benchmarks/results/kv_sharing.{json,md}``.

    python benchmarks/kv_sharing.py --decode-only   # time again, keep the committed quality
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from common import RESULTS, ROOT, WORK, command_line, log, write_results
from kv_sharing_report import EVAL_TOKENS, markdown

from layerfuse.data import corpus
from layerfuse.data.tokens import load_tokenizer
from layerfuse.generate.memory import decode_memory
from layerfuse.generate.timing import DecodeCase, DecodeTarget, decode_prompts, run_decode_bench
from layerfuse.model.io import load_model, parameter_count, save_model
from layerfuse.model.manifest import carry_manifest
from layerfuse.passes.plan import apply_plan
from layerfuse.passes.planner import DataSettings
from layerfuse.passes.prune import PruneRequest, plan_prune
from layerfuse.passes.share_kv import ShareKVRequest, kv_layers, plan_share_kv
from layerfuse.runtime.evaluate import evaluate_model

MODEL = "smollm2-135m"
FOLDER = WORK / "kv_sharing"
SHARES = {
    "1/3": [(3 * k + 1, 3 * k) for k in range(10)],
    "1/2": [(2 * k + 1, 2 * k) for k in range(15)],
}
# Batch 8 is tiled: one real prompt prefilled, its cache repeated into 8 rows (a real prefill
# of 8 x 4096 tokens takes minutes per variant on 2 cores and GBs of attention scores).
CASES = (
    DecodeCase(1, 128, 32, repeats=3),
    DecodeCase(8, 128, 32, repeats=3, tiled=True),
    DecodeCase(1, 1024, 32, repeats=2),
    DecodeCase(8, 1024, 32, repeats=2, tiled=True),
    DecodeCase(1, 4096, 16, repeats=2),
    DecodeCase(8, 4096, 16, repeats=2, tiled=True),
)
MEMORY = CASES[-1]
TIMED = (
    "original",
    "KV shared 1/3",
    "attention removed 1/3",
    "KV shared 1/2",
    "attention removed 1/2",
)
THREADS = 2


def exported() -> Path:
    from layerfuse.export.onnx_export import export_model
    from layerfuse.export.sources import load_source

    path = FOLDER / "original" / "model.onnx"
    if not path.exists():
        log("exporting SmolLM2-135M with a KV cache")
        export_model(load_source(MODEL), path.parent, kv_cache=True)
    return path


def build(original: Path, name: str, make_plan) -> Path:
    """The variant's graph, planned (``make_plan()``) and written once."""
    path = FOLDER / name.replace(" ", "-").replace("/", "_") / "model.onnx"
    if not path.exists():
        log(f"building {name}")
        save_model(apply_plan(original, make_plan()), path)
        carry_manifest(original, path)
    return path


def variants(original: Path) -> dict[str, Path]:
    """Per fraction: adjacent pairs and the planner's pairs, each as they are and aligned,
    then attention removal at the same KV bytes."""
    paths = {"original": original}
    data = DataSettings(calib_tokens=2048, valid_tokens=2048)
    for fraction, pairs in SHARES.items():
        for name, request in (
            (f"shared {fraction}", ShareKVRequest(layers=pairs, align=False)),
            (f"aligned {fraction}", ShareKVRequest(layers=pairs, data=data)),
        ):
            paths[f"KV {name}"] = build(
                original, name, lambda r=request: plan_share_kv(original, r)
            )
        for name, align in (
            (f"shared planned {fraction}", False),
            (f"aligned planned {fraction}", True),
        ):
            request = ShareKVRequest(layers=len(pairs), align=align, data=data)
            paths[f"KV {name}"] = build(
                original, name, lambda r=request: plan_share_kv(original, r)
            )
        removal = PruneRequest(target="attention", count=len(pairs), data=data)
        removed = build(original, f"removed {fraction}", lambda r=removal: plan_prune(original, r))
        paths[f"attention removed {fraction}"] = removed
    return paths


def recover(original: Path, path: Path, steps: int) -> Path:
    out = path.parent.with_name(path.parent.name + "-recovered") / "model.onnx"
    if not out.exists():
        log(f"recovering {path.parent.name} ({steps} steps)")
        command = [
            sys.executable, "-m", "layerfuse", "recover", str(original), str(path), "-o", str(out),
            "--steps", str(steps), "--batch-size", "4", "--grad-accum", "1", "--seq-len", "64",
            "--warmup", "2", "--lr", "2e-4", "--eval-every", "0", "--local-steps", "0",
        ]  # fmt: skip
        subprocess.run(command, check=True, cwd=ROOT)
    return out


def perplexity(path: Path) -> float:
    result = evaluate_model(path, tokens=EVAL_TOKENS, provider="cpu", latency_runs=1)
    return float(result["perplexity"])


def quality(original: Path, paths: dict[str, Path], steps: int) -> list[dict]:
    """Test perplexity of every variant before and after the same recovery."""
    rows = []
    first = [name for name in paths if "aligned planned" in name]  # the likeliest best first
    for name in [*first, *(name for name in paths if name not in first)]:
        path = paths[name]
        model = load_model(path)
        row = {
            "variant": name,
            "layers_with_cache": len(kv_layers(model)),
            "parameters": parameter_count(model),
            "perplexity": perplexity(path),
        }
        if name != "original":
            recovered = recover(original, path, steps)
            row["perplexity_recovered"] = perplexity(recovered)
        rows.append(row)
        log(f"{name}: {row}")
    rows.sort(key=lambda row: list(paths).index(row["variant"]))
    return rows


def decode(original: Path, paths: dict[str, Path]) -> dict:
    """Decode speed of the plain variants (an aligned or planned one has the graph of the plain
    share at its fraction, only other weights), all interleaved in one run, then the memory
    of decoding at the largest tiled case, one fresh process per variant."""
    tokenizer = load_tokenizer(original.parent / "tokenizer")
    texts = corpus.split_texts("test")
    timed = {name: paths[name] for name in TIMED}
    loads = {"before": os.getloadavg()[0]}
    speeds = run_decode_bench(
        [DecodeTarget(name, path) for name, path in timed.items()],
        CASES,
        lambda case: decode_prompts(tokenizer, texts, case.batch, case.context),
        provider="cpu",
        threads=THREADS,
        log=log,
    )
    loads["after"] = os.getloadavg()[0]
    prompt = decode_prompts(tokenizer, texts, 1, MEMORY.context)
    memory = []
    for name, path in timed.items():
        log(f"memory of {name} at {MEMORY.label}")
        found = decode_memory(
            path, prompt, new_tokens=MEMORY.new_tokens, copies=MEMORY.batch, threads=THREADS
        )
        memory.append({"target": name, "case": MEMORY.label, **found})
        log(f"{name}: peak RSS {found['peak_rss_bytes'] / 2**30:.2f} GiB")
    return {"decode": speeds, "memory": memory, "load_average_1m": loads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16, help="recovery steps per variant")
    skip = parser.add_mutually_exclusive_group()
    skip.add_argument("--no-decode", action="store_true", help="keep the committed decode rows")
    skip.add_argument("--decode-only", action="store_true", help="keep the committed quality rows")
    skip.add_argument(
        "--report-only", action="store_true", help="re-render the committed JSON's Markdown"
    )
    args = parser.parse_args()
    committed = json.loads((RESULTS / "kv_sharing.json").read_text())
    if args.report_only:
        from layerfuse.files import write_text_atomic

        write_text_atomic(RESULTS / "kv_sharing.md", markdown(committed))
        return
    original = exported()
    paths = variants(original)
    if args.decode_only:
        results = {k: committed[k] for k in ("rows", "recovery_steps")}
        results["quality_from"] = "committed run"
    else:
        results = {"rows": quality(original, paths, args.steps), "recovery_steps": args.steps}
    if args.no_decode:
        kept = ("decode", "memory", "load_average_1m")
        results.update({k: committed[k] for k in kept if k in committed})
        results["decode_from"] = "committed run"
    else:
        results.update(decode(original, paths))
    results["command"] = command_line()
    write_results("kv_sharing", results, markdown(results))


if __name__ == "__main__":
    main()
