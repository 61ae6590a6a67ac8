"""Big models through every command with bounded memory (issue 24).

Synthetic Llama-3-8B-shaped decoders (hidden 4096, FF 14336, GQA 32/8, vocabulary 128256,
random weights, external data; :mod:`layerfuse.export.synthetic`) with as many layers as the
target size needs, and SmolLM2-135M. Each command runs in a fresh process (``layerfuse ...``)
whose peak RSS comes from ``wait4``; a guard kills a command when the machine's available
memory falls below ``--guard-gib`` (the machine is shared) and records it as killed. Every
generated model and output is deleted afterwards.

    python benchmarks/big_models.py                      # fp16 8 GiB, fp32 sized to fit
    python benchmarks/big_models.py --fp32-gib 14        # the issue's size, if RAM allows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

from common import RESULTS, WORK, exported_model, log, write_results
from report_big_models import markdown, targets

from layerfuse.export.synthetic import SyntheticConfig, layers_for_bytes
from layerfuse.model.io import file_bytes, load_model
from layerfuse.passes.detect import detect_structure
from layerfuse.runtime.widening import available_memory

GIB = 1 << 30
LAYERFUSE = str(Path(sys.executable).with_name("layerfuse"))
ORDER = ["smollm2", "float16", "float32", "gemma-vocab"]
PLANNING = ["--data", "random", "--calib-tokens", "256", "--valid-tokens", "128"]


def available_bytes() -> int:
    available = available_memory()
    if available is None:
        raise RuntimeError("no MemAvailable in /proc/meminfo: the memory guard needs it")
    return available


def measured(name: str, argv: list[str], guard: int, log_path: Path) -> dict:
    """Run ``argv`` in a fresh process; wall time, its peak RSS, and whether the guard fired."""
    log(f"{name}: {' '.join(argv[-6:])}")
    start, killed = time.perf_counter(), False
    with open(log_path, "ab") as output:
        child = subprocess.Popen(argv, stdout=output, stderr=output, start_new_session=True)
        while True:
            pid, status, usage = os.wait4(child.pid, os.WNOHANG)
            if pid:
                break
            if not killed and available_bytes() < guard:
                os.killpg(child.pid, signal.SIGKILL)
                killed = True
            time.sleep(0.25)
    row = {
        "command": name,
        "wall_s": round(time.perf_counter() - start, 1),
        "peak_rss_bytes": usage.ru_maxrss * 1024,
        "returncode": os.waitstatus_to_exitcode(status),
        "killed_by_memory_guard": killed,
    }
    log(f"{name}: {row['wall_s']} s, peak RSS {row['peak_rss_bytes'] / GIB:.2f} GiB")
    return row


def generate(config: SyntheticConfig, folder: Path, guard: int, log_path: Path) -> dict:
    code = (
        "import json, sys; from layerfuse.export.synthetic import SyntheticConfig, "
        "write_synthetic_model as w; w(SyntheticConfig(**json.loads(sys.argv[1])), sys.argv[2])"
    )
    argv = [sys.executable, "-c", code, json.dumps(asdict(config)), str(folder)]
    return measured("generate", argv, guard, log_path)


def rewritten_bytes(model: Path, plan: Path) -> int:
    """Bytes of the FF weights a merge plan's windows or a fuse plan's runs rewrite."""
    data = json.loads(plan.read_text())
    if "windows" in data:
        chosen = [index for window in data["windows"] for index in window["blocks"]]
    else:
        chosen = [index for first, last in data["fuse"] for index in range(first, last + 1)]
    blocks = detect_structure(load_model(model)).blocks
    return sum(
        linear.weight.const_value.nbytes
        for index in chosen
        for linear in blocks[index].ff.linears.values()
    )


def commands(model: Path, out: Path, options: dict) -> list[tuple[str, list[str], Path | None]]:
    """(name, argv, output folder to delete after) for every command measured on ``model``."""
    source, merged, pruned = str(model), out / "merge" / "model.onnx", out / "prune" / "model.onnx"

    def replay(op: str, planned: Path, folder: str) -> tuple[list[str], Path]:
        plan, written = planned.with_suffix(".plan.json"), out / folder / "model.onnx"
        return [op, source, "--plan", str(plan), "-o", str(written)], written.parent

    merge = ["merge", source, "--blocks", options["window"], "--method", options["method"]]
    prune = ["prune", source, "--target", "block", "--count", "2", "--select", "influence"]
    chosen = out / "prune-blocks" / "model.onnx"  # no calibration: a plan to replay always
    prune_blocks = ["prune", source, "--target", "block", "--blocks", "3,5", "-o", str(chosen)]
    fused, window = out / "fuse" / "model.onnx", options["window"]
    fuse = ["fuse", source, "--drop-attention", window, "--runs", window, "--include-last"]
    quantize = ["quantize", source, "--int4", "-o", str(out / "int4" / "model.onnx")]
    bench = ["bench", source, "--inputs", "1x16", "--warmup", "1", "--runs", "3", "--no-memory"]
    listed = [
        ("inspect", ["inspect", source], None),
        ("merge plan+apply", [*merge, *PLANNING, "-o", str(merged)], None),
        ("merge --plan apply", *replay("merge", merged, "merge-plan")),
        ("prune plan+apply", [*prune, *PLANNING, "-o", str(pruned)], None),
        ("prune --blocks apply", prune_blocks, None),
        ("prune --plan apply", *replay("prune", chosen, "prune-plan")),
        ("fuse plan+apply", [*fuse, "-o", str(fused)], None),
        ("fuse --plan apply", *replay("fuse", fused, "fuse-plan")),
        ("quantize --int4", quantize, out / "int4"),
        ("bench 1x16", [*bench, "--provider", "cpu"], None),
    ]
    return [(name, [LAYERFUSE, *argv], folder) for name, argv, folder in listed]


def _keep_plans_only(folder: Path) -> None:
    """Delete a measured output but its plan, which a later command replays."""
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
        elif not path.name.endswith(".plan.json"):
            path.unlink()


def series(label: str, model: Path, out: Path, options: dict, guard: int) -> dict:
    model_bytes = file_bytes(model)
    rows, log_path = [], out / "commands.log"
    previous = {row["command"]: row for row in options.pop("previous", [])}
    for name, argv, folder in commands(model, out, options):
        if name in previous:  # --reuse: the last run's measurement of this command
            rows.append(previous[name] | {"reused": True})
            continue
        row = measured(name, argv, guard, log_path)
        written = Path(argv[argv.index("-o") + 1]) if "-o" in argv else None
        if written is not None and written.exists():
            row["output_bytes"] = file_bytes(written)
        planned = name in ("merge plan+apply", "fuse plan+apply")
        if planned and written is not None and written.exists():
            key = "rewritten_bytes" if name.startswith("merge") else "fuse_rewritten_bytes"
            options[key] = rewritten_bytes(model, written.with_suffix(".plan.json"))
        rows.append(row)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
        elif written is not None and written.parent.is_dir():
            _keep_plans_only(written.parent)  # the disk holds the source and one output
    shutil.rmtree(out / "merge", ignore_errors=True)
    for folder in ("prune", "prune-blocks", "fuse"):
        shutil.rmtree(out / folder, ignore_errors=True)
    return {"model": label, "model_bytes": model_bytes, **options, "commands": rows}


def previous_runs() -> list[dict]:
    path = RESULTS / "big_models.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def reused(key: str, names: list[str]) -> dict:
    """Options that keep the previous results' rows of ``names`` for the model ``key`` (not
    measured again), with the rewritten bytes their plans recorded (the apply targets)."""
    earlier = [run for run in previous_runs() if run.get("key") == key]
    rows = [row for run in earlier for row in run["commands"] if row["command"] in names]
    options: dict = {"previous": rows}
    for command, field in (
        ("merge plan+apply", "rewritten_bytes"),
        ("fuse plan+apply", "fuse_rewritten_bytes"),
    ):
        recorded = [run[field] for run in earlier if field in run]
        if command in names and recorded:
            options[field] = recorded[-1]
    return options


def merged_with_previous(runs: list[dict]) -> list[dict]:
    """This invocation's runs plus the previous file's runs of the models not run now."""
    previous = previous_runs()
    keys = {run["key"] for run in runs}
    return [run for run in previous if run.get("key") not in keys] + runs


# Gemma-3-270M's vocabulary and widths (head_dim here is hidden / heads), tied, fp32.
GEMMA_VOCAB = SyntheticConfig(
    hidden=640, ff=2048, heads=4, kv_heads=1, layers=18, vocab=262144, dtype="float32", tied=True
)


def synthetic_series(key: str, config: SyntheticConfig, args, reuse: list[str]) -> dict:
    guard = int(args.guard_gib * GIB)
    folder = WORK / "big_models" / f"synthetic-{key}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    made = generate(config, folder / "model", guard, folder / "commands.log")
    options = {"config": asdict(config), "window": "3-4", "method": "vanilla"}
    options |= reused(key, reuse)
    label = f"synthetic {config.dtype} ({config.layers} layers, vocabulary {config.vocab})"
    try:
        result = series(label, folder / "model" / "model.onnx", folder, options, guard)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    return result | {"generate": made, "key": key}


def sized(dtype: str, gib: float) -> SyntheticConfig:
    """Llama-3-8B's shapes with the layers that make ``gib`` GiB."""
    layers = layers_for_bytes(SyntheticConfig(dtype=dtype), int(gib * GIB))
    return SyntheticConfig(dtype=dtype, layers=layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fp16-gib", type=float, default=8.0)
    parser.add_argument("--fp32-gib", type=float, default=None, help="default: what RAM allows")
    parser.add_argument("--guard-gib", type=float, default=3.0)
    parser.add_argument("--only", default="smollm2,fp16,fp32,gemma")
    parser.add_argument("--keep", action="store_true", help="keep generated models")
    parser.add_argument("--reuse", default="", help="commands whose last results are kept")
    args = parser.parse_args()
    reuse = [name for name in args.reuse.split(",") if name]
    guard, wanted, runs = int(args.guard_gib * GIB), args.only.split(","), []
    if "smollm2" in wanted:
        out = WORK / "big_models" / "smollm2"
        out.mkdir(parents=True, exist_ok=True)
        options = {"window": "10-14", "method": "permute"} | reused("smollm2", reuse)
        label, model = "SmolLM2-135M (fp32)", exported_model("smollm2-135m")
        runs.append(series(label, model, out, options, guard) | {"key": "smollm2"})
    if "fp16" in wanted:
        runs.append(synthetic_series("float16", sized("float16", args.fp16_gib), args, reuse))
    if "fp32" in wanted:
        # Planning holds about the model plus 2 GiB: leave the guard and 4 GiB for others.
        fits = (available_bytes() - guard - 4 * GIB - 2 * GIB) / GIB
        gib = args.fp32_gib if args.fp32_gib is not None else min(14.0, fits)
        run = synthetic_series("float32", sized("float32", gib), args, reuse)
        runs.append(run | {"fp32_gib_asked": gib})
    if "gemma" in wanted:
        runs.append(synthetic_series("gemma-vocab", GEMMA_VOCAB, args, reuse))
    runs = sorted(merged_with_previous(runs), key=lambda run: ORDER.index(run["key"]))
    results = {
        "runs": runs,
        "targets": targets(runs),
        "ram_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
    }
    write_results("big_models", results, markdown(results))


if __name__ == "__main__":
    main()
