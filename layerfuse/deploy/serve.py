"""Start a real inference server on ONNX models or a Triton repository, and know its state.

``start_server`` turns what the user named (``.onnx`` files, ``NAME=FILE.onnx``, model
folders, Triton repositories) into one engine's command line, starts it as a child process,
waits until it answers, and reads the repository index, so that a model that failed to load
is reported with the server's own reason, and refused unless ``keep_going``.

- triton: the bundled ``tritonserver``. ``.onnx`` files are served through a throw-away
  Python-backend repository whose files are symlinks (nothing is copied); repositories are
  served as they are, so they must use the Python backend (the bundled server has no
  onnxruntime backend). tritonserver listens on private loopback ports behind a
  :class:`~layerfuse.deploy.triton_front.TritonFront` on the user's ports, which refuses the
  requests that would crash it and reloads a model whose Python stub died.
- kserve: KServe's ``ModelServer`` with one :class:`~layerfuse.deploy.kserve_model.OnnxModel`
  per graph; a repository contributes each model folder's newest version.
"""

from __future__ import annotations

__all__ = [
    "ENGINES",
    "WORKDIR_PREFIX",
    "ModelStatus",
    "RunningServer",
    "ServeOptions",
    "remove_stale_workdirs",
    "start_server",
]

import os
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from layerfuse.deploy.engine_commands import kserve_command_for, triton_command_for
from layerfuse.deploy.process import (
    ServerProcess,
    StartCancelled,
    check_port_free,
    free_port,
    http_request,
)
from layerfuse.deploy.triton_repo import (
    CONFIG,
    check_name,
)
from layerfuse.errors import LayerfuseError
from layerfuse.files import remove_stale_staging

if TYPE_CHECKING:
    from layerfuse.deploy.triton_front import TritonFront

ENGINES = ("triton", "kserve")
WORKDIR_PREFIX = "layerfuse-serve-"


@dataclass(frozen=True)
class ServeOptions:
    engine: str = "triton"
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    max_batch_size: int = 8
    instances: int = 1
    threads: int = 0
    max_input_elements: int = 16384
    max_body_bytes: int = 64 * 1024 * 1024
    provider: str = "cpu"
    grace_seconds: int = 10
    stub_site: Path | None = None
    keep_going: bool = False
    startup_timeout: float = 300.0


@dataclass(frozen=True)
class ModelStatus:
    name: str
    state: str
    reason: str = ""

    @property
    def ready(self) -> bool:
        return self.state == "READY"


@dataclass
class RunningServer:
    """A started server: its process, addresses and the state of every model."""

    options: ServeOptions
    process: ServerProcess
    models: list[ModelStatus]
    _workdir: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    front: TritonFront | None = field(default=None, repr=False)  # triton only

    @property
    def http_url(self) -> str:
        return f"http://{_client_host(self.options.host)}:{self.options.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{_client_host(self.options.host)}:{self.options.grpc_port}"

    def wait(self) -> int:
        code = self.process.process.wait()
        self._cleanup()
        return code

    def terminate(self) -> None:
        """Ask the server to finish in-flight requests and exit (safe in a signal handler)."""
        if self.front is not None:
            self.front.stubs.stop()  # stubs exit on purpose from here on: no reload
        self.process.terminate()

    def kill(self) -> None:
        self.process.kill()

    def stop(self) -> int:
        if self.front is not None:
            self.front.stubs.stop()
        code = self.process.stop(timeout=self.options.grace_seconds + 20)
        self._cleanup()
        return code

    def _cleanup(self) -> None:
        if self.front is not None:
            self.front.stubs.stop()
            self.front.stop()
            self.front = None
        if self._workdir is not None:
            self._workdir.cleanup()
            self._workdir = None

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _client_host(host: str) -> str:
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def _resolve(items: list[str]) -> tuple[dict[str, Path], list[Path]]:
    """Split the command line into named ONNX files and Triton repositories."""
    files: dict[str, Path] = {}
    repos: list[Path] = []
    for item in items:
        name, _, text = item.rpartition("=") if "=" in item else ("", "", item)
        path = Path(text)
        if not path.exists():
            raise LayerfuseError(f"{text}: no such file or folder")
        if path.is_dir() and any(path.glob(f"*/{CONFIG}")) and not name:
            repos.append(path)
            continue
        if path.is_dir() and (path / "model.onnx").is_file():
            path = path / "model.onnx"
        if path.suffix != ".onnx" or not path.is_file():
            raise LayerfuseError(
                f"{text}: not an .onnx file, a folder with model.onnx, or a Triton repository"
            )
        name = check_name(name or (path.parent.name if path.stem == "model" else path.stem))
        if name in files:
            raise LayerfuseError(f"two models are named '{name}': name them with NAME=PATH")
        files[name] = path
    return files, repos


def remove_stale_workdirs() -> None:
    """Remove the throw-away folders of earlier runs whose process is gone (SIGKILLed)."""
    remove_stale_staging(tempfile.gettempdir(), WORKDIR_PREFIX)


def _model_states(url: str) -> list[ModelStatus]:
    try:
        status, index = http_request(f"{url}/v2/repository/index", body={})
    except OSError as exc:
        raise LayerfuseError(f"the server stopped answering at {url}: {exc}") from None
    if status != 200 or not isinstance(index, list):
        raise LayerfuseError(f"the server's repository index answered {status}: {index}")
    # Triton's reason carries the Python stub's traceback after the message: keep the message.
    return [
        ModelStatus(
            entry["name"],
            entry.get("state", "UNKNOWN"),
            (entry.get("reason") or "").strip().split("\n", 1)[0],
        )
        for entry in index
    ]


def _start_front(options: ServeOptions, process: ServerProcess, ports, log):
    from layerfuse.deploy.stub_watch import StubWatch
    from layerfuse.deploy.triton_front import TritonFront

    stubs = StubWatch(process.pid, f"http://127.0.0.1:{ports[0]}", log).start()
    try:
        return TritonFront(
            options.host,
            options.http_port,
            options.grpc_port,
            *ports,
            max_elements=options.max_input_elements,
            max_body=options.max_body_bytes,
            stubs=stubs,
        ).start()
    except OSError as exc:
        stubs.stop()
        raise LayerfuseError(
            f"cannot listen on {options.host}:{options.http_port}/{options.grpc_port}: "
            f"{exc.strerror or exc}"
        ) from None


def start_server(
    items: list[str],
    options: ServeOptions,
    log: TextIO | None = sys.stderr,
    cancel: threading.Event | None = None,
) -> RunningServer:
    """Start ``options.engine`` on ``items`` and return once it answers; the server's log goes
    to ``log`` line by line. Setting ``cancel`` while it starts kills the child, removes the
    temporary folder and raises StartCancelled."""
    if options.engine not in ENGINES:
        raise LayerfuseError(f"unknown engine '{options.engine}' (choose {', '.join(ENGINES)})")
    files, repos = _resolve(items)
    check_port_free(options.host, options.http_port, "--port")
    check_port_free(options.host, options.grpc_port, "--grpc-port")
    remove_stale_workdirs()
    workdir = tempfile.TemporaryDirectory(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
    triton = options.engine == "triton"
    # tritonserver gets private loopback ports; its front takes the user's.
    ports = (free_port(), free_port()) if triton else (options.http_port, options.grpc_port)
    try:
        if triton:
            command, env = triton_command_for(files, repos, options, Path(workdir.name), ports)
        else:
            command, env = kserve_command_for(files, repos, options)
        process = ServerProcess(options.engine, command, env, log).start()
    except BaseException:
        workdir.cleanup()
        raise
    server = RunningServer(options, process, [], workdir)
    upstream = f"http://127.0.0.1:{ports[0]}" if triton else server.http_url
    try:
        process.wait_until(f"{upstream}/v2/health/live", options.startup_timeout, cancel)
        server.models = _model_states(upstream)
        if triton:
            server.front = _start_front(options, process, ports, log)
    except StartCancelled:
        server.kill()  # nothing is served yet: no grace to give
        server.stop()
        raise
    except BaseException:
        server.stop()
        raise
    failed = [model for model in server.models if not model.ready]
    if failed and not options.keep_going:
        server.stop()
        raise LayerfuseError(
            f"model '{failed[0].name}' failed to load: {failed[0].reason or failed[0].state}"
            + (f" (and {len(failed) - 1} more)" if len(failed) > 1 else "")
            + "; --keep-going serves the others"
        )
    return server
