"""``layerfuse serve`` killed or stopped mid-way (issue 19): after a SIGKILL its server must
not outlive it (the ports come free; the temporary repository is left for the next start to
remove), and a SIGTERM while loading stops it cleanly, its temporary repository and server
gone.

The tiny graph and the process helpers are ``test_serve_robust.py``'s.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from layerfuse.deploy.process import check_port_free, free_port
from layerfuse.deploy.serve import WORKDIR_PREFIX, remove_stale_workdirs
from layerfuse.errors import LayerfuseError
from tests.engines import require_engine
from tests.test_serve_robust import _alive, _children, _wait_for, tiny_graph  # noqa: F401


def _port_free(port: int) -> bool:
    try:
        check_port_free("127.0.0.1", port, "--port")
    except LayerfuseError:
        return False
    return True


def _serve(engine: str, graph: Path, http: int, grpc: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "layerfuse", "serve", str(graph), "--engine", engine,
               "--port", str(http), "--grpc-port", str(grpc)]  # fmt: skip
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _workdirs(pid: int) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"{WORKDIR_PREFIX}{pid}-*"))


@pytest.mark.parametrize("engine", ["triton", "kserve"])
def test_no_orphan_after_sigkill_of_serve(engine, tiny_graph):  # noqa: F811
    require_engine(engine)
    http, grpc = free_port(), free_port()
    serve = _serve(engine, tiny_graph, http, grpc)
    try:
        for line in serve.stdout:
            if "Ctrl-C stops" in line:
                break
        children = _children(serve.pid)
        assert len(children) == 1 and _alive(children[0])
        serve.kill()
        assert serve.wait(timeout=30) == -signal.SIGKILL
        # A killed process's threads may outlive its zombie leader by a moment: poll the ports.
        _wait_for(lambda: not _alive(children[0]), "the server to die with serve", timeout=30)
        _wait_for(lambda: _port_free(http) and _port_free(grpc), "the ports", timeout=30)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert _workdirs(serve.pid), "a SIGKILL leaves the temporary folder to the next start"
    remove_stale_workdirs()
    assert not _workdirs(serve.pid)


@pytest.mark.parametrize("engine", ["triton", "kserve"])
def test_sigterm_while_loading_stops_cleanly_and_removes_the_temporary_repository(
    engine,
    tiny_graph,  # noqa: F811
):
    require_engine(engine)
    http, grpc = free_port(), free_port()
    serve = _serve(engine, tiny_graph, http, grpc)
    try:
        _wait_for(lambda: _workdirs(serve.pid) and _children(serve.pid), "serve to start a server")
        children = _children(serve.pid)
        serve.send_signal(signal.SIGTERM)
        out, err = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.kill()
    assert serve.returncode == 0, err
    assert "Ctrl-C stops" not in out
    assert err.strip().splitlines()[-1] == "layerfuse: stopped before the server was ready"
    assert not _workdirs(serve.pid)
    assert not any(_alive(pid) for pid in children)
    check_port_free("127.0.0.1", http, "--port")
