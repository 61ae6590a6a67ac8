"""Serving load test (issue 16): SmolLM2-135M original vs tied vs fused behind real servers.

For each engine (the bundled Triton with the Python backend, KServe's ModelServer), one server
per variant is started on loopback with ``layerfuse.deploy.serve.start_server`` (what
``layerfuse serve`` runs). Each server first answers one request that is compared with a
direct onnxruntime run. Then concurrent tritonclient HTTP clients send fixed-shape requests
(random token ids, batch 1) in short timed phases, the variants interleaved round by round so
that load from other processes falls on all of them alike. Reported per engine and variant:
requests, errors (must be 0), throughput, p50/p99 latency, and the server's memory (PSS of the
server's process tree, sampled once a second: flat means bounded).

Variants (no calibration data needed; quality is not measured here): ``tied`` merges the FFs
of blocks 19-29 by plain averaging (one shared weight set), ``fused`` drops attention in
blocks 4-9 and fuses the FFNs of blocks 3-8 into one node (the plan of ffn_fusion.py).

    python benchmarks/serve_load.py                       # about 6 minutes on 2 cores
    python benchmarks/serve_load.py --engines triton --seconds 5 --rounds 1
"""

from __future__ import annotations

import argparse
import contextlib
import os

from common import RESULTS, WORK, exported_model, log, markdown_table, write_results
from load_clients import MemorySampler, check_numbers, load_phase, summarize

from layerfuse.deploy.process import free_port
from layerfuse.deploy.serve import ServeOptions, start_server
from layerfuse.model.fingerprint import fingerprint
from layerfuse.model.io import load_model, save_model
from layerfuse.passes.fuse import FusePlan
from layerfuse.passes.merge import MergeRequest, plan_merge
from layerfuse.passes.plan import apply_plan

MODEL = "smollm2-135m"
VARIANTS = ("original", "tied", "fused")
HEADERS = "engine|variant|requests|errors|throughput req/s|p50 ms|p99 ms|memory MiB|diff|exit"


def variant_paths() -> dict:
    original = exported_model(MODEL)
    graph = load_model(original)
    plans = {
        "tied": lambda: plan_merge(original, MergeRequest(ranges=[(19, 29)], method="vanilla")),
        "fused": lambda: FusePlan(fingerprint(graph), 30, list(range(4, 10)), [(3, 8)]),
    }
    paths = {"original": original}
    for name, plan in plans.items():
        paths[name] = WORK / "serve" / name / "model.onnx"
        if not paths[name].exists():
            log(f"building the {name} variant")
            save_model(apply_plan(original, plan()), paths[name])
    return paths


def start_servers(engine: str, paths: dict, args, sinks: contextlib.ExitStack) -> dict:
    """One server per variant; each one's log goes to a file kept open while it runs."""
    logs = WORK / "serve" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    servers = {}
    for name in VARIANTS:
        options = ServeOptions(
            engine=engine,
            http_port=free_port(),
            grpc_port=free_port(),
            threads=args.threads,
            provider="cpu",
            grace_seconds=10,
        )
        log(f"{engine}: starting a server on {name}")
        sink = sinks.enter_context((logs / f"{engine}-{name}.log").open("w"))
        servers[name] = sinks.enter_context(start_server([f"{name}={paths[name]}"], options, sink))
    return servers


def run_engine(engine: str, paths: dict, args) -> dict:
    with contextlib.ExitStack() as sinks:
        servers = start_servers(engine, paths, args, sinks)
        diffs = {
            name: check_numbers(server.http_url.removeprefix("http://"), name, paths[name])
            for name, server in servers.items()
        }
        sampler = MemorySampler({name: s.process.pid for name, s in servers.items()})
        sampler.start()
        phases = {name: [] for name in VARIANTS}
        for round_index in range(args.rounds):
            for name in VARIANTS:
                log(f"{engine}: round {round_index + 1}/{args.rounds}, {name}")
                url = servers[name].http_url.removeprefix("http://")
                phases[name].append(load_phase(url, name, args.clients, args.seconds, args.tokens))
        sampler.halt.set()
        sampler.join()
        codes = {name: server.stop() for name, server in servers.items()}
    return summarize(phases, sampler.samples, diffs, codes)


def figure(results: dict, path) -> None:
    from layerfuse.reports.plots import pyplot, save_figure

    plt = pyplot()
    engines = list(results)
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.5))
    width = 0.8 / len(engines)
    for offset, engine in enumerate(engines):
        rows = results[engine]["variants"]
        positions = [i + offset * width for i in range(len(VARIANTS))]
        axes[0].bar(positions, [rows[v]["throughput_rps"] for v in VARIANTS], width, label=engine)
        axes[1].bar(positions, [rows[v]["p99_ms"] for v in VARIANTS], width, label=engine)
        for variant in VARIANTS:
            times, mib = zip(*rows[variant]["memory_samples"], strict=True)
            axes[2].plot(times, mib, label=f"{engine} {variant}")
    for axis, title in zip(axes[:2], ("throughput (requests/s)", "p99 latency (ms)"), strict=True):
        axis.set_xticks([i + width * (len(engines) - 1) / 2 for i in range(len(VARIANTS))])
        axis.set_xticklabels(VARIANTS)
        axis.set_title(title)
        axis.legend(fontsize=8)
    axes[2].set_title("server memory (PSS, MiB) during the load test")
    axes[2].set_xlabel("seconds")
    axes[2].legend(fontsize=7)
    save_figure(fig, path)


def markdown(results: dict, args) -> str:
    rows = []
    for engine, document in results.items():
        base = document["variants"]["original"]
        for variant in VARIANTS:
            r = document["variants"][variant]
            ratio = r["throughput_rps"] / base["throughput_rps"]
            rows.append(
                [
                    engine, variant, r["requests"], r["errors"],
                    f"{r['throughput_rps']:.2f} ({ratio:.2f}x)",
                    f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
                    f"{r['memory_mib_first']:.0f} / {r['memory_mib_max']:.0f} / "
                    f"{r['memory_mib_last']:.0f}",
                    f"{r['max_abs_diff_vs_onnxruntime']:.1e}", r["exit_status"],
                ]
            )  # fmt: skip
    loads = ", ".join(f"{e} {d['load_average']}" for e, d in results.items())
    return (
        f"# Serving {MODEL}: original vs tied vs fused on real servers (loopback)\n\n"
        f"{args.clients} concurrent tritonclient HTTP clients, requests of 1 x {args.tokens} "
        f"random token ids (logits 1 x {args.tokens} x 49152 back), {args.rounds} rounds of "
        f"{args.seconds:g} s per variant, variants interleaved; onnxruntime threads per model "
        f"{args.threads or 'default'}. One server per variant; Triton is the bundled 2.51 "
        "with the Python backend (dynamic batching up to 8), KServe is 0.21's ModelServer. "
        "Memory is the PSS of the server's process tree (first / max / last sample, once a "
        "second). `diff` is max |served - direct onnxruntime| logits for one request. "
        f"The machine's 2 cores are shared with other work: 1-minute load average {loads} "
        "(before the engine's run, after it); compare ratios within an engine.\n\n"
        + markdown_table(
            HEADERS.split("|"),
            rows,
        )
        + "\n`tied`: FFs of blocks 19-29 averaged into one shared weight set; `fused`: "
        "attention dropped in blocks 4-9, FFNs of blocks 3-8 fused into one node. "
        "Quality is not measured here (see merge_quality.md and ffn_fusion_cpu.md).\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engines", default="triton,kserve", help="comma-separated")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--seconds", type=float, default=15, help="seconds per phase")
    parser.add_argument("--rounds", type=int, default=3, help="phases per variant")
    parser.add_argument("--tokens", type=int, default=16, help="tokens per request")
    parser.add_argument("--threads", type=int, default=0, help="onnxruntime threads per model")
    args = parser.parse_args()
    paths = variant_paths()
    results = {}
    for engine in args.engines.split(","):
        before = round(os.getloadavg()[0], 2)
        variants = run_engine(engine, paths, args)
        results[engine] = {
            "variants": variants,
            "load_average": [before, round(os.getloadavg()[0], 2)],
        }
        for name, r in variants.items():
            log(
                f"{engine} {name}: {r['requests']} requests, {r['errors']} errors, "
                f"{r['throughput_rps']:.2f} req/s, p50 {r['p50_ms']:.0f} ms, "
                f"p99 {r['p99_ms']:.0f} ms, memory {r['memory_mib_max']:.0f} MiB max"
            )
    figure(results, RESULTS / "serve_load.png")
    settings = {k: getattr(args, k) for k in ("clients", "seconds", "rounds", "tokens", "threads")}
    write_results("serve_load", {"settings": settings, "engines": results}, markdown(results, args))


if __name__ == "__main__":
    main()
