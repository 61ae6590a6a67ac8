"""Benchmark several graphs of one model family side by side, under the same conditions.

Timing is interleaved: every repetition runs each graph once, starting from a different graph
each round, so drifts in machine load (another process, thermal state) spread over all graphs
instead of biasing whichever ran last. On CUDA inputs and outputs are bound to the device
(IO binding), so host-device copies are not timed; with ``cuda_graph`` each shape's run is
captured once as a CUDA graph (onnxruntime ``enable_cuda_graph``, inputs and outputs in fixed
device buffers, one graph id per shape) and replayed, so kernel-launch overhead is not timed
either and a fused-vs-unfused ratio measures the work. Every ratio is taken against the first
graph measured in the same run; absolute times are reported but never compared across runs.
"""

from __future__ import annotations

__all__ = ["SCHEMA", "BenchConfig", "GraphResult", "run_bench"]

import os
from dataclasses import dataclass, field
from pathlib import Path

from layerfuse.errors import LayerfuseError
from layerfuse.model.manifest import read_manifest
from layerfuse.model.stats import ModelStats, model_stats
from layerfuse.progress import SILENT, Reporter
from layerfuse.runtime.calibration import adapt_feeds
from layerfuse.runtime.environment import environment
from layerfuse.runtime.inputs import InputShape, cache_inputs, graph_inputs, synthetic_feeds
from layerfuse.runtime.measure import LatencyStats, MemoryStats, measure_memory
from layerfuse.runtime.session import PROVIDERS, create_session, resolve_provider

SCHEMA = "layerfuse.bench/1"


@dataclass
class BenchConfig:
    shapes: list[InputShape]
    provider: str = "auto"
    warmup: int = 3
    runs: int = 20
    threads: int | None = None
    # None: layerfuse's policy (runtime/session.py); True/False force it.
    prepacking: bool | None = None
    memory: bool = True
    eval_data: str | None = None
    eval_tokens: int = 8192
    cuda_graph: bool = False

    def to_json(self) -> dict:
        return {
            "shapes": [str(s) for s in self.shapes],
            "provider": self.provider,
            "warmup": self.warmup,
            "runs": self.runs,
            "threads": self.threads,
            "prepacking": self.prepacking,
            "eval_data": self.eval_data,
            "eval_tokens": self.eval_tokens,
            "cuda_graph": self.cuda_graph,
        }


@dataclass
class GraphResult:
    name: str
    path: Path
    stats: ModelStats
    latency: dict[str, LatencyStats] = field(default_factory=dict)
    memory: MemoryStats | None = None
    quality: dict | None = None

    def tokens_per_second(self, shape: InputShape) -> float:
        return shape.batch * shape.sequence / (self.latency[str(shape)].p50_ms / 1000.0)


def _check_same_inputs(paths: list[Path]) -> None:
    """Same inputs apart from KV caches (an empty one each; removed attention has none)."""
    signatures = {}
    for path in paths:
        caches = cache_inputs(path)
        signatures[path] = [entry for entry in graph_inputs(path) if entry[0] not in caches]
    first = paths[0]
    for path in paths[1:]:
        if [(n, t) for n, t, _ in signatures[path]] != [(n, t) for n, t, _ in signatures[first]]:
            names = ", ".join(n for n, _, _ in signatures[path]) or "none"
            expected = ", ".join(n for n, _, _ in signatures[first]) or "none"
            raise LayerfuseError(
                f"{path} takes inputs ({names}) but {first} takes ({expected}); "
                f"only graphs with the same inputs can be compared"
            )


class _Runner:
    """Runs one graph on fixed feeds; binds to the device once on CUDA.

    ``graph_id`` (CUDA graphs): onnxruntime captures a graph on its first run with a graph id
    (it repeats that run internally until captured) and replays it on every later one, so the
    outputs must be fixed device buffers before then. One run with ``gpu_graph_id=-1`` (no
    capture) gives their shapes; they are bound, and the next run (a warm-up) captures.
    """

    def __init__(self, session, feeds: dict, provider: str, graph_id: int | None = None) -> None:
        self.session = session
        self.binding = None
        self.options = None
        feeds = adapt_feeds(session, feeds)
        if provider == PROVIDERS["cuda"]:
            import onnxruntime as ort

            self.binding = session.io_binding()
            for name, value in feeds.items():
                self.binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy(value, "cuda", 0)
                )
            for output in session.get_outputs():
                self.binding.bind_output(output.name, "cuda")
        if graph_id is not None and self.binding is not None:
            self._fix_outputs(graph_id)
        self.feeds = feeds

    def _fix_outputs(self, graph_id: int) -> None:
        import onnxruntime as ort

        uncaptured = ort.RunOptions()
        uncaptured.add_run_config_entry("gpu_graph_id", "-1")
        self.session.run_with_iobinding(self.binding, uncaptured)
        outputs = self.binding.get_outputs()
        for output, value in zip(self.session.get_outputs(), outputs, strict=True):
            fixed = ort.OrtValue.ortvalue_from_shape_and_type(
                value.shape(), value.numpy().dtype, "cuda", 0
            )
            self.binding.bind_ortvalue_output(output.name, fixed)
        self.options = ort.RunOptions()
        self.options.add_run_config_entry("gpu_graph_id", str(graph_id))

    def __call__(self) -> None:
        if self.binding is not None:
            self.session.run_with_iobinding(self.binding, self.options)
        else:
            self.session.run(None, self.feeds)


def _time_interleaved(runners: list[_Runner], warmup: int, runs: int) -> list[list[float]]:
    import time

    for runner in runners:
        for _ in range(warmup):
            runner()
    samples: list[list[float]] = [[] for _ in runners]
    count = len(runners)
    for repetition in range(runs):
        for offset in range(count):
            index = (repetition + offset) % count
            start = time.perf_counter()
            runners[index]()
            samples[index].append(time.perf_counter() - start)
    return samples


def _check_context(path: Path, shapes: list) -> None:
    """Refuse sequences longer than the model was built for, before onnxruntime tries them
    (it fails deep inside with an allocation error, or answers with garbage positions)."""
    manifest = read_manifest(path)
    limit = (manifest.config if manifest else {}).get("max_positions")
    too_long = [shape for shape in shapes if limit and shape.sequence > limit]
    if too_long:
        raise LayerfuseError(
            f"input shape {too_long[0]} is longer than the {limit} positions {path} was built for"
        )


def run_bench(
    paths: list[str | os.PathLike],
    config: BenchConfig,
    *,
    names: list[str] | None = None,
    reporter: Reporter = SILENT,
) -> dict:
    """Measure every graph; the result is the ``layerfuse.bench/1`` JSON document."""
    paths = [Path(p) for p in paths]
    if len(paths) < 1:
        raise LayerfuseError("give at least one graph to benchmark")
    if names is not None and len(names) != len(paths):
        raise LayerfuseError(f"{len(names)} names given for {len(paths)} graphs")
    _check_context(paths[0], config.shapes)
    provider = resolve_provider(config.provider)
    results = []
    for index, path in enumerate(paths):
        name = (
            names[index] if names else path.parent.name if path.name == "model.onnx" else path.stem
        )
        results.append(GraphResult(name, path, model_stats(path)))
    if len({r.name for r in results}) != len(results):
        raise LayerfuseError("graph names must be unique; pass --names")
    _check_same_inputs(paths)
    if config.cuda_graph and provider != PROVIDERS["cuda"]:
        raise LayerfuseError("CUDA graphs need the CUDA provider (--provider cuda)")
    reporter.step(f"building {len(paths)} sessions on {provider}")
    sessions = [
        create_session(
            path,
            provider=config.provider,
            threads=config.threads,
            prepacking=config.prepacking,
            provider_options={"enable_cuda_graph": "1"} if config.cuda_graph else None,
        )
        for path in paths
    ]
    for index, shape in enumerate(
        reporter.track(config.shapes, len(config.shapes), "timing shapes")
    ):
        feeds = synthetic_feeds(paths[0], shape)
        graph_id = index if config.cuda_graph else None
        runners = [_Runner(session, feeds, provider, graph_id) for session in sessions]
        samples = _time_interleaved(runners, config.warmup, config.runs)
        for result, timings in zip(results, samples, strict=True):
            result.latency[str(shape)] = LatencyStats.from_samples(timings)
    if config.memory:
        feeds = synthetic_feeds(paths[0], config.shapes[0])
        device = "cuda" if provider == PROVIDERS["cuda"] else "cpu"
        for result in reporter.track(results, len(results), "memory"):
            result.memory = measure_memory(
                result.path, feeds, provider=device, prepacking=config.prepacking
            )
    if config.eval_data:
        _add_quality(results, config, reporter)
    return _document(results, config, provider)


def _add_quality(results: list[GraphResult], config: BenchConfig, reporter: Reporter) -> None:
    from layerfuse.runtime.evaluate import evaluate_model

    reference = results[0].path
    for result in reporter.track(results, len(results), "quality"):
        evaluation = evaluate_model(
            result.path,
            data=config.eval_data,
            tokens=config.eval_tokens,
            provider=config.provider,
            reference=None if result.path == reference else reference,
            latency_runs=1,
        )
        metric = evaluation["metric"]
        # The reference's task-free fidelity to itself is 1 by definition.
        value = evaluation.get(metric, 1.0 if metric == "mean_cosine" else None)
        result.quality = {"metric": metric, "value": value}
        if "bos" in evaluation:
            result.quality["bos"] = evaluation["bos"]
        if "fidelity" in evaluation:
            result.quality["fidelity"] = evaluation["fidelity"]


def _document(results: list[GraphResult], config: BenchConfig, provider: str) -> dict:
    first = results[0]
    graphs = []
    for result in results:
        ratios: dict = {
            "speedup": {
                shape: first.latency[shape].p50_ms / result.latency[shape].p50_ms
                for shape in result.latency
            },
            "file_size": result.stats.file_bytes / first.stats.file_bytes,
            "parameters": result.stats.parameters / max(first.stats.parameters, 1),
        }
        if result.memory is not None and first.memory is not None:
            ratios["memory"] = result.memory.after_run_bytes / max(first.memory.after_run_bytes, 1)
        graphs.append(
            {
                "name": result.name,
                "path": str(result.path),
                "stats": result.stats.to_json(),
                "latency": {shape: stats.to_json() for shape, stats in result.latency.items()},
                "tokens_per_second": {
                    str(shape): result.tokens_per_second(shape) for shape in config.shapes
                },
                "memory": None if result.memory is None else result.memory.to_json(),
                "quality": result.quality,
                "ratios": ratios,
            }
        )
    return {
        "schema": SCHEMA,
        "provider": provider,
        "config": config.to_json(),
        "environment": environment(),
        "graphs": graphs,
    }
