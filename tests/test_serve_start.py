"""Starting servers, without the module's running one: a model that fails to load stops the
start unless ``keep_going``, and ``layerfuse serve`` prints its endpoints, serves the right
numbers, refuses a busy port with one line and stops cleanly on SIGTERM.

The deployed variants and the request helpers are ``test_serve.py``'s.
"""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from layerfuse.cli import main
from layerfuse.deploy.process import check_port_free, free_port
from layerfuse.deploy.serve import start_server
from layerfuse.errors import LayerfuseError
from tests.engines import require_engine
from tests.test_serve import _expected, _inputs, _options, httpclient, repo, variants  # noqa: F401


def test_a_failed_model_stops_the_start_unless_keep_going(repo):  # noqa: F811
    require_engine("triton")
    options = _options("triton", keep_going=False)
    with pytest.raises(LayerfuseError, match=r"model 'broken' failed to load: .+--keep-going"):
        start_server([str(repo)], options, log=None)
    check_port_free(options.host, options.http_port, "--port")  # the server is gone


def test_serve_command_prints_endpoints_refuses_a_busy_port_and_stops_on_sigterm(variants, capsys):  # noqa: F811
    require_engine("triton")
    port = free_port()
    command = [sys.executable, "-m", "layerfuse", "serve", str(variants["tied"]),
               "--port", str(port), "--grpc-port", str(free_port())]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if "Ctrl-C stops" in line:
                break
        assert f"model tied: http://127.0.0.1:{port}/v2/models/tied (ready)" in "".join(lines)
        client = httpclient.InferenceServerClient(f"127.0.0.1:{port}")
        logits = client.infer("tied", _inputs(httpclient)).as_numpy("logits")
        client.close()
        assert np.max(np.abs(logits - _expected(variants["tied"]))) <= 1e-5

        assert main(["serve", str(variants["original"]), "--port", str(port)]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"layerfuse: error: port {port} on 127.0.0.1 is not available (Address already "
            f"in use); choose another with --port"
        )
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0
        assert "server stopped (exit status 0)" in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    check_port_free("127.0.0.1", port, "--port")
