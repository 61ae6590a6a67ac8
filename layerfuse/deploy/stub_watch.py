"""Which Triton Python stubs are alive, read from ``/proc``, and a reload for a model whose
stub died.

tritonserver 2.51 keeps answering ``/v2/health/ready`` with 200 after a model's Python stub
has died, and fails every later request to that model with 500 ("Stub process is not
healthy"); it never restarts the stub. So ``layerfuse serve`` watches the stubs itself: each
is a child of tritonserver whose second argument is ``REPO/MODEL/VERSION/model.py``. Readiness
asked through the front checks the stubs at that moment, and a watcher thread reloads a model
whose stub is gone (tritonserver runs with ``--model-control-mode explicit`` so that it can),
which starts fresh stubs.
"""

from __future__ import annotations

__all__ = ["StubWatch"]

import sys
import threading
from pathlib import Path
from typing import TextIO

from layerfuse.deploy.process import http_request

_STUB = "triton_python_backend_stub"


def _children(pid: int) -> list[int]:
    found = []
    for listing in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            found += [int(child) for child in listing.read_text().split()]
        except OSError:
            continue
    return found


def _alive(pid: int) -> bool:
    """Running (a zombie is dead: tritonserver has not reaped it yet)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _stub_model(pid: int) -> str | None:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 2 or not argv[0].endswith(_STUB.encode()):
        return None
    return Path(argv[1].decode(errors="replace")).parents[1].name


class StubWatch:
    """The stubs of one tritonserver, and a thread that reloads a model whose stub died."""

    def __init__(self, server_pid: int, upstream_url: str, log: TextIO | None = sys.stderr):
        self.server_pid, self.upstream_url, self.log = server_pid, upstream_url, log
        self._known: dict[int, str] = {}  # stub pid -> model, every stub ever seen alive
        self._reloading: set[str] = set()
        self._retired: set[int] = set()  # stubs of a reloaded model's old instances
        self._lock = threading.Lock()
        self._stopped = threading.Event()

    def _scan(self) -> None:
        for pid in _children(self.server_pid):
            if pid not in self._known and pid not in self._retired and _alive(pid):
                model = _stub_model(pid)
                if model is not None:
                    self._known[pid] = model

    def _dead(self) -> set[str]:
        """Models with a stub that died since it was last loaded (the caller holds the lock)."""
        self._scan()
        return {model for pid, model in self._known.items() if not _alive(pid)}

    def dead_models(self) -> set[str]:
        """Models that are not ready as of now: a stub died, or the reload is under way."""
        with self._lock:
            return self._dead() | self._reloading

    def _reload(self, model: str) -> None:
        with self._lock:
            self._retired |= {pid for pid, name in self._known.items() if name == model}
            self._known = {pid: name for pid, name in self._known.items() if name != model}
            self._reloading.add(model)
        if self.log is not None:
            print(f"layerfuse: the Python stub of model '{model}' died; reloading it",
                  file=self.log, flush=True)  # fmt: skip
        url = f"{self.upstream_url}/v2/repository/models/{model}/load"
        try:
            status, answer = http_request(url, body={}, timeout=600)
        except OSError as exc:
            status, answer = 0, str(exc)
        finally:
            with self._lock:
                self._reloading.discard(model)
        if status != 200 and self.log is not None and not self._stopped.is_set():
            print(f"layerfuse: reloading model '{model}' failed ({status}): {answer}",
                  file=self.log, flush=True)  # fmt: skip

    def _run(self, period: float) -> None:
        while not self._stopped.wait(period):
            with self._lock:
                dead = self._dead()
            for model in sorted(dead):
                if self._stopped.is_set():
                    return
                self._reload(model)

    def start(self, period: float = 0.5) -> StubWatch:
        self.dead_models()
        threading.Thread(target=self._run, args=(period,), daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop watching (before the server shuts down, when its stubs exit on purpose); no
        join, so a signal handler may call it while a reload is under way."""
        self._stopped.set()
