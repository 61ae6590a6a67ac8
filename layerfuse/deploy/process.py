"""A server in a child process: start it, relay its log, wait until it answers, stop it.

Both engines run as children of ``layerfuse serve`` (tritonserver is a binary; the KServe
server gets an interpreter of its own, so its signal handlers and event loop are its own).
The child runs in its own session, so a Ctrl-C in the terminal reaches only ``layerfuse``,
which forwards one SIGTERM: both servers then finish in-flight requests, refuse new ones and
exit. A second Ctrl-C kills the child's process group. The child also dies with ``layerfuse``:
it asks the kernel (``prctl(PR_SET_PDEATHSIG, SIGKILL)``, before exec) to kill it when its
parent goes, so a SIGKILLed ``layerfuse serve`` leaves no server holding the port (the parent
is the thread that started the child: start servers from a thread that outlives them).

Every child gets ``MALLOC_MMAP_THRESHOLD_=131072``: glibc then serves large blocks with mmap
and returns them on free, so the buffers onnxruntime frees while pre-packing tied weights do
not stay in the server's RSS.
"""

from __future__ import annotations

__all__ = [
    "SERVER_ENV",
    "ServerProcess",
    "StartCancelled",
    "check_port_free",
    "free_port",
    "http_request",
]

import collections
import ctypes
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from typing import TextIO

from layerfuse.errors import LayerfuseError

SERVER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
_PR_SET_PDEATHSIG = 1
# Resolved here, in the parent: the forked child should run as little Python as it can.
_prctl = ctypes.CDLL(None, use_errno=True).prctl


def _die_with(parent: int):
    """A ``preexec_fn``: SIGKILL this child when ``parent`` exits, even by SIGKILL."""

    def arrange() -> None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)

    return arrange


class StartCancelled(Exception):
    """A stop was asked for while the server was still starting."""


def check_port_free(host: str, port: int, option: str) -> None:
    """Refuse a busy port before starting anything (servers notice it only after loading)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise LayerfuseError(
                f"port {port} on {host} is not available ({exc.strerror}); choose another "
                f"with {option}"
            ) from None


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (for tests and benchmarks)."""
    with socket.socket() as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def http_request(url: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, object]:
    """(status, parsed JSON or text) for a GET, or a POST when ``body`` is given."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"} if data else {}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, payload = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, payload = exc.code, exc.read()
    try:
        return status, json.loads(payload)
    except ValueError:
        return status, payload.decode(errors="replace")


class ServerProcess:
    """One server child: its log goes line by line to ``log`` (prefixed) and a short tail."""

    def __init__(
        self, label: str, command: list[str], env: dict[str, str], log: TextIO | None
    ) -> None:
        self.label, self.command, self.log = label, command, log
        self.env = {**os.environ, **SERVER_ENV, **env}
        self.tail: collections.deque[str] = collections.deque(maxlen=40)
        self.process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def start(self) -> ServerProcess:
        self.process = subprocess.Popen(
            self.command,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            # Two calls, no imports, no locks: safe enough in a child forked from threads.
            preexec_fn=_die_with(os.getpid()),  # noqa: PLW1509
        )
        self._reader = threading.Thread(target=self._relay, daemon=True)
        self._reader.start()
        return self

    def _relay(self) -> None:
        for line in self.process.stdout:
            self.tail.append(line.rstrip())
            if self.log is not None:
                self.log.write(f"[{self.label}] {line}")
                self.log.flush()

    def last_error(self) -> str:
        """The most telling line of the log so far (an error line if there is one)."""
        lines = [line for line in self.tail if line.strip()]
        errors = [line for line in lines if "error" in line.lower()]
        return (errors or lines or ["(no output)"])[-1].strip()

    def wait_until(self, url: str, timeout: float, cancel: threading.Event | None = None) -> float:
        """Seconds until ``url`` answers 200; a LayerfuseError if the child dies or stalls,
        StartCancelled once ``cancel`` is set (a signal handler sets it: raising from the
        handler itself could land anywhere, even inside Popen)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if cancel is not None and cancel.is_set():
                raise StartCancelled
            if self.process.poll() is not None:
                self._reader.join(timeout=2)
                raise LayerfuseError(
                    f"{self.label} exited with status {self.process.returncode} before it was "
                    f"ready: {self.last_error()}"
                )
            try:
                if http_request(url, timeout=1.0)[0] == 200:
                    return time.monotonic() - started
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise LayerfuseError(f"{self.label} did not answer {url} within {timeout:.0f} s")

    def terminate(self) -> None:
        """Ask the server to shut down gracefully (safe to call from a signal handler)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)

    def stop(self, timeout: float = 30.0) -> int:
        """Graceful stop, then a kill of the whole process group after ``timeout`` seconds."""
        if self.process is None:
            return 0
        self.terminate()
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.process.wait()
        self._reader.join(timeout=5)
        return code
