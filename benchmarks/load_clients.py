"""Load on served models for ``serve_load.py``: concurrent tritonclient HTTP clients in timed
phases, one request's logits checked against a direct onnxruntime run, the PSS of a server's
process tree sampled in the background, and the per-variant summary of it all.

Requests carry random token ids below 49,152 (SmolLM2's vocabulary) and a full attention mask.
"""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import psutil

from layerfuse.runtime.session import create_session

MIB = 1024 * 1024


class MemorySampler(threading.Thread):
    """PSS (shared pages split between the processes sharing them) of each server's process
    tree, once per ``interval`` seconds."""

    def __init__(self, pids: dict, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.pids, self.interval = pids, interval
        self.samples = {name: [] for name in pids}
        self.started = time.monotonic()
        self.halt = threading.Event()

    @staticmethod
    def tree_pss(pid: int) -> int:
        root = psutil.Process(pid)
        total = 0
        for process in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += process.memory_full_info().pss
        return total

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            now = round(time.monotonic() - self.started, 1)
            for name, pid in self.pids.items():
                self.samples[name].append((now, round(self.tree_pss(pid) / MIB, 1)))


def request(ids: np.ndarray) -> list:
    """The model's two inputs for token ids ``ids`` (all positions attended)."""
    import tritonclient.http as httpclient

    inputs = []
    for name, array in (("input_ids", ids), ("attention_mask", np.ones_like(ids))):
        tensor = httpclient.InferInput(name, list(array.shape), "INT64")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def load_phase(url: str, model: str, clients: int, seconds: float, tokens: int) -> dict:
    """``clients`` threads, each with its own HTTP client, send requests until time is up."""
    import tritonclient.http as httpclient

    latencies, errors = [], []
    deadline = time.monotonic() + seconds

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        connection = httpclient.InferenceServerClient(url, network_timeout=120)
        try:
            while time.monotonic() < deadline:
                inputs = request(rng.integers(0, 49152, (1, tokens), dtype=np.int64))
                started = time.perf_counter()
                try:
                    connection.infer(model, inputs).as_numpy("logits")
                    latencies.append(time.perf_counter() - started)
                except Exception as exc:  # counted and reported; the run goes on
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=(seed,)) for seed in range(clients)]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {
        "seconds": time.monotonic() - started,
        "latencies": latencies,
        "errors": errors,
    }


def check_numbers(url: str, model: str, path) -> float:
    import tritonclient.http as httpclient

    ids = np.arange(1, 17, dtype=np.int64)[None] * 37
    connection = httpclient.InferenceServerClient(url)
    served = connection.infer(model, request(ids)).as_numpy("logits")
    connection.close()
    direct = create_session(path, provider="cpu").run(
        ["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    )[0]
    return float(np.max(np.abs(served - direct)))


def summarize(phases: dict, samples: dict, diffs: dict, codes: dict) -> dict:
    result = {}
    for name, runs in phases.items():
        latencies = np.array([x for run in runs for x in run["latencies"]]) * 1000
        seconds = sum(run["seconds"] for run in runs)
        memory = [mib for _, mib in samples[name]]
        result[name] = {
            "requests": int(latencies.size),
            "errors": sum(len(run["errors"]) for run in runs),
            "error_examples": [e for run in runs for e in run["errors"]][:3],
            "throughput_rps": latencies.size / seconds,
            "p50_ms": float(np.percentile(latencies, 50)),
            "p99_ms": float(np.percentile(latencies, 99)),
            "memory_mib_first": memory[0],
            "memory_mib_max": max(memory),
            "memory_mib_last": memory[-1],
            "memory_samples": samples[name],
            "max_abs_diff_vs_onnxruntime": diffs[name],
            "exit_status": codes[name],
        }
    return result
