"""Latency and memory of onnxruntime sessions.

Memory is measured in a fresh child process per graph: RSS before the session exists, after
it is built, and after the first run (external weights are memory-mapped and only count once
touched; pre-packed copies appear at load), plus the peak on the way. Measuring several
sessions in one process would mix in allocator caching from the previous one. The session is
built by ``create_session`` exactly as a layerfuse user's process builds it, pre-packing
policy and the release of freed packing buffers included, so the numbers are what such a
process holds; ``release_memory=False`` shows what a process that skips the release holds.

onnxruntime keeps external weight files mapped, and how much of a mapping is resident after a
run depends on the page cache (readahead and fault-around map more when the file is cold, a
file just written is partly mapped from cache): measured as it comes, one variant's figure
depended on what ran before it (a freshly recovered model read 37 MiB more than the same
bytes copied elsewhere). So the child first drops the model's files from the page cache
(``posix_fadvise(DONTNEED)``; clean pages only, nothing is lost) and every graph is measured
from the same cold start.
"""

from __future__ import annotations

__all__ = [
    "LatencyStats",
    "MemoryStats",
    "evict_from_page_cache",
    "measure_latency",
    "measure_memory",
    "peak_rss_bytes",
    "reset_peak_rss",
    "rss_bytes",
    "run_probe",
]

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from layerfuse.model.publish import model_files
from layerfuse.runtime.procfs import proc_bytes


def peak_rss_bytes() -> int | None:
    """Peak resident set size of this process so far (Linux ``VmHWM``), None elsewhere."""
    return proc_bytes("/proc/self/status", "VmHWM")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its RSS now (Linux ``clear_refs``), so a later
    :func:`peak_rss_bytes` is the peak of what ran since; False where that is unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def rss_bytes() -> int:
    """Resident set size of this process (Linux /proc, else peak RSS from getrusage)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def evict_from_page_cache(paths: list[Path]) -> None:
    """Ask the kernel to drop the cached pages of ``paths`` (a no-op where unsupported)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


@dataclass
class LatencyStats:
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float

    @classmethod
    def from_samples(cls, samples_s: list[float]) -> LatencyStats:
        ms = np.asarray(samples_s) * 1000.0
        return cls(
            runs=len(ms),
            p50_ms=float(np.percentile(ms, 50)),
            p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)),
            mean_ms=float(ms.mean()),
        )

    def to_json(self) -> dict:
        return asdict(self)


def measure_latency(session, feeds: dict, *, warmup: int = 3, runs: int = 20) -> LatencyStats:
    """Wall time of ``session.run`` on fixed feeds, after warm-up runs."""
    for _ in range(warmup):
        session.run(None, feeds)
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        samples.append(time.perf_counter() - start)
    return LatencyStats.from_samples(samples)


@dataclass
class MemoryStats:
    """Memory growth of a process that builds one session and runs it once.

    On CPU: resident set size. On CUDA: device memory the process holds (nvidia-smi), with
    the host RSS growth kept in ``host_bytes``. ``peak_bytes`` is the highest host RSS over
    load and run above the RSS before loading (pre-packing holds a weight twice for a moment).
    """

    load_bytes: int
    after_run_bytes: int
    host_bytes: int | None = None
    peak_bytes: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _probe(
    model_path: str, feeds_path: str, provider: str, prepacking: str, release: str = "1"
) -> dict:
    """Child-process side of :func:`measure_memory`."""
    from layerfuse.runtime.calibration import adapt_feeds
    from layerfuse.runtime.session import PREPACKING, create_session

    with np.load(feeds_path) as data:
        feeds = {name: data[name] for name in data.files}
    evict_from_page_cache(model_files(model_path))
    before = rss_bytes()
    device_before = _device_used_bytes() if provider == "cuda" else 0
    session = create_session(
        model_path,
        provider=provider,
        prepacking=PREPACKING[prepacking],
        threads=1,
        release_memory=release == "1",
    )
    loaded = rss_bytes()
    session.run(None, adapt_feeds(session, feeds))
    host = rss_bytes() - before
    peak = peak_rss_bytes()
    peak_growth = None if peak is None else peak - before
    if provider == "cuda":
        return {
            "load_bytes": 0,
            "after_run_bytes": _device_used_bytes() - device_before,
            "host_bytes": host,
            "peak_bytes": peak_growth,
        }
    return {"load_bytes": loaded - before, "after_run_bytes": host, "peak_bytes": peak_growth}


def _device_used_bytes() -> int:
    """Memory in use on GPU 0, as nvidia-smi reports it (MiB resolution).

    Read for the whole device rather than per process: inside containers and VMs the
    process ids nvidia-smi lists often belong to another PID namespace. The probe runs
    alone in its own process, so the growth between two readings is its own.
    """
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
        capture_output=True,
        text=True,
        check=True,
    )
    return int(result.stdout.strip().splitlines()[0]) * 1024 * 1024


def measure_memory(
    model_path: str | os.PathLike,
    feeds: dict,
    *,
    provider: str = "cpu",
    prepacking: bool | None = None,
    release_memory: bool = True,
    env: dict[str, str] | None = None,
) -> MemoryStats:
    """Build a session for ``model_path`` in a fresh process and report its RSS growth.

    ``env`` adds variables to the child's environment (an allocator tunable such as
    ``MALLOC_MMAP_THRESHOLD_`` or an ``LD_PRELOAD``ed allocator, to measure their effect).
    """
    mode = "auto" if prepacking is None else ("on" if prepacking else "off")
    with tempfile.TemporaryDirectory() as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        arguments = [str(model_path), str(feeds_path), provider, mode]
        arguments.append("1" if release_memory else "0")
        result = run_probe("layerfuse.runtime.measure", arguments, str(model_path), env)
    return MemoryStats(**result)


def run_probe(
    module: str, arguments: list[str], what: str, env: dict[str, str] | None = None
) -> dict:
    """Run ``python -m module arguments`` in a fresh process and return the JSON object its
    last line of output prints: a process of its own, so that its memory figures hold only
    what the probe did. ``env`` adds variables to the child's environment."""
    result = subprocess.run(
        [sys.executable, "-m", module, *arguments],
        capture_output=True,
        text=True,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )
    if result.returncode != 0:
        last = (result.stderr.strip() or "no output").splitlines()[-1]
        raise RuntimeError(f"memory measurement of {what} failed: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_probe(*sys.argv[1:6])))
