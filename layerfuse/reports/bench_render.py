"""Render a ``layerfuse.bench/1`` result as a terminal table, Markdown, and a PNG chart."""

from __future__ import annotations

__all__ = ["bench_figure", "bench_markdown", "bench_table"]

import os
from pathlib import Path

from rich.table import Table

from layerfuse.reports.plots import pyplot, save_figure
from layerfuse.reports.tables import human_bytes, human_count


def _memory(graph: dict) -> str:
    memory = graph.get("memory")
    return "-" if memory is None else human_bytes(memory["after_run_bytes"])


def _quality(graph: dict) -> str:
    quality = graph.get("quality")
    if not quality or quality.get("value") is None:
        return "-"
    text = f"{quality['value']:.4g}"
    fidelity = quality.get("fidelity")
    if fidelity:
        text += f" (cos {fidelity['mean_cosine']:.3f})"
    return text


def _rows(document: dict) -> tuple[list[str], list[list[str]]]:
    shapes = document["config"]["shapes"]
    metric = next((g["quality"]["metric"] for g in document["graphs"] if g.get("quality")), None)
    headers = ["graph", "params", "file", "memory"]
    headers += [f"p50 {shape} (speedup)" for shape in shapes]
    if metric:
        headers.append(metric.replace("_", " "))
    rows = []
    for graph in document["graphs"]:
        ratios = graph["ratios"]
        memory = _memory(graph)
        if "memory" in ratios:
            memory += f" ({ratios['memory']:.2f}x)"
        row = [
            graph["name"],
            human_count(graph["stats"]["parameters"]),
            f"{human_bytes(graph['stats']['file_bytes'])} ({ratios['file_size']:.2f}x)",
            memory,
        ]
        for shape in shapes:
            latency = graph["latency"][shape]
            row.append(f"{latency['p50_ms']:.2f} ms ({ratios['speedup'][shape]:.2f}x)")
        if metric:
            row.append(_quality(graph))
        rows.append(row)
    return headers, rows


def bench_table(document: dict) -> Table:
    headers, rows = _rows(document)
    table = Table(
        title=f"onnxruntime {document['provider']}, ratios vs {rows[0][0]}", title_justify="left"
    )
    for header in headers:
        table.add_column(header)
    for row in rows:
        table.add_row(*row)
    return table


def bench_markdown(document: dict) -> str:
    headers, rows = _rows(document)
    config = document["config"]
    machine = document["environment"]["machine"]
    environment = document["environment"]
    loaded = environment.get("onnxruntime_loaded") or environment["packages"].get("onnxruntime")
    lines = [
        f"Provider `{document['provider']}`; {config['runs']} interleaved runs after "
        f"{config['warmup']} warm-up runs per input shape (batch x sequence); speedup and "
        f"memory are ratios against `{rows[0][0]}` measured in the same run.",
        f"Machine: {machine['cpu']}, {machine['cores']} cores"
        + (f", GPU {machine['gpu']}" if machine.get("gpu") else "")
        + f"; onnxruntime {loaded}.",
        "",
        "| " + " | ".join(headers) + " |",
        "|" + "---|" * len(headers),
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    percentile_headers = ["graph", "shape", "p50 ms", "p90 ms", "p99 ms", "tokens/s"]
    lines += [
        "",
        "| " + " | ".join(percentile_headers) + " |",
        "|" + "---|" * len(percentile_headers),
    ]
    for graph in document["graphs"]:
        for shape, latency in graph["latency"].items():
            lines.append(
                f"| {graph['name']} | {shape} | {latency['p50_ms']:.2f} | {latency['p90_ms']:.2f} "
                f"| {latency['p99_ms']:.2f} | {graph['tokens_per_second'][shape]:.0f} |"
            )
    return "\n".join(lines) + "\n"


def bench_figure(document: dict, path: str | os.PathLike) -> Path:
    """Speedup per input shape and memory/file ratios, one bar per graph."""
    import numpy as np

    plt = pyplot()

    graphs = document["graphs"]
    shapes = document["config"]["shapes"]
    figure, (left, right) = plt.subplots(
        1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [max(2, len(shapes)), 2]}
    )
    width = 0.8 / len(graphs)
    for index, graph in enumerate(graphs):
        offsets = np.arange(len(shapes)) + (index - (len(graphs) - 1) / 2) * width
        left.bar(
            offsets, [graph["ratios"]["speedup"][s] for s in shapes], width, label=graph["name"]
        )
    left.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    left.set_xticks(np.arange(len(shapes)), shapes)
    left.set_xlabel("batch x sequence")
    left.set_ylabel(f"speedup vs {graphs[0]['name']} (p50)")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    measures = [m for m in ("file_size", "memory") if m in graphs[-1]["ratios"]]
    for index, graph in enumerate(graphs):
        offsets = np.arange(len(measures)) + (index - (len(graphs) - 1) / 2) * width
        right.bar(offsets, [graph["ratios"][m] for m in measures], width, label=graph["name"])
    right.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    right.set_xticks(np.arange(len(measures)), [m.replace("_", " ") for m in measures])
    right.set_ylabel(f"ratio vs {graphs[0]['name']}")
    right.grid(axis="y", alpha=0.3)
    figure.suptitle(f"onnxruntime {document['provider']}")
    return save_figure(figure, path)
