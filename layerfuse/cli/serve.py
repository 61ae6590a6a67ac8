"""``layerfuse serve``: a real inference server (Triton or KServe) on ONNX models.

The server runs as a child process; its log streams to stderr (or ``--log-file``), the
endpoints go to stdout once every model has loaded. Ctrl-C or SIGTERM is forwarded once as
SIGTERM (the server finishes in-flight requests, then exits); a second one kills it. While
models load, Ctrl-C or SIGTERM kills the child, removes the temporary repository and exits 0
with one line.
"""

from __future__ import annotations

__all__ = ["register"]

import argparse
import signal
import sys
import threading
from pathlib import Path

from layerfuse.cli.common import add_provider_option, console
from layerfuse.errors import LayerfuseError


def _options(args: argparse.Namespace):
    from layerfuse.deploy.serve import ServeOptions

    if args.max_body_mb <= 0:
        raise LayerfuseError("--max-body-mb must be positive")
    return ServeOptions(
        engine=args.engine,
        host=args.host,
        http_port=args.port,
        grpc_port=args.grpc_port if args.grpc_port is not None else args.port + 1,
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        threads=args.threads,
        max_input_elements=args.max_input_elements,
        max_body_bytes=int(args.max_body_mb * 1024 * 1024),
        provider=args.provider,
        grace_seconds=args.grace_seconds,
        stub_site=args.stub_site,
        keep_going=args.keep_going,
    )


def _print_endpoints(server) -> None:
    out = console()
    options = server.options
    out.print(f"serving with {options.engine} on {options.host}:")
    out.print(f"  HTTP  {server.http_url}/v2  (KServe v2 REST protocol)")
    out.print(f"  gRPC  {server.grpc_address}  (inference.GRPCInferenceService)")
    out.print(f"  health {server.http_url}/v2/health/live, {server.http_url}/v2/health/ready")
    for model in server.models:
        state = "ready" if model.ready else f"FAILED: {model.reason or model.state}"
        out.print(f"  model {model.name}: {server.http_url}/v2/models/{model.name} ({state})")
    out.print("Ctrl-C stops the server.")


def _run(args: argparse.Namespace) -> int:
    from layerfuse.deploy.process import StartCancelled
    from layerfuse.deploy.serve import start_server

    log = open(args.log_file, "a") if args.log_file else sys.stderr  # noqa: SIM115
    server = None
    starting = threading.Event()  # set: stop while starting (the child is killed, folder removed)
    stops = 0

    def forward(signum, frame):
        nonlocal stops
        if server is None:
            starting.set()
            return
        stops += 1
        if stops == 1:
            print("layerfuse: stopping the server (again to kill it)", file=sys.stderr)
            server.terminate()
        else:
            server.kill()

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            server = start_server(args.models, _options(args), log, cancel=starting)
        except StartCancelled:
            print("layerfuse: stopped before the server was ready", file=sys.stderr)
            return 0
        if starting.is_set():  # the signal came after the start, before `server` was set
            forward(signal.SIGTERM, None)
        _print_endpoints(server)
        code = server.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not stops:
        raise LayerfuseError(
            f"{args.engine} exited on its own with status {code}: {server.process.last_error()}"
        )
    print(f"layerfuse: server stopped (exit status {code})", file=sys.stderr)
    return 0


def _add_limits(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-input-elements",
        type=int,
        default=16384,
        help="refuse a request whose input has more elements (400) (default 16384)",
    )
    parser.add_argument(
        "--max-body-mb",
        type=float,
        default=64,
        help="refuse larger request bodies (413 / RESOURCE_EXHAUSTED); for triton, the "
        "front layerfuse puts before it does this, as the bundled Triton 2.51 cannot "
        "(default 64)",
    )
    parser.add_argument(
        "--grace-seconds",
        type=int,
        default=10,
        help="on stop, how long in-flight requests may take to finish (default 10)",
    )


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-batch-size",
        type=int,
        default=8,
        help="triton: largest batch the dynamic batcher stacks from .onnx models (default 8)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=1,
        help="triton: model instances (stub processes) per .onnx model (default 1)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="onnxruntime intra-op threads per model instance; 0 leaves onnxruntime's "
        "default (default 0)",
    )
    add_provider_option(parser)


def register(commands) -> None:
    parser = commands.add_parser(
        "serve",
        help="start a Triton or KServe server on ONNX models",
        description="Serve .onnx files (NAME=FILE to name them), model folders or Triton "
        "repositories over the KServe v2 protocol (HTTP and gRPC).",
    )
    parser.add_argument(
        "models", nargs="+", help="MODEL.onnx, NAME=MODEL.onnx, a folder with model.onnx, or REPO"
    )
    parser.add_argument(
        "--engine",
        default="triton",
        choices=["triton", "kserve"],
        help="triton: the tritonserver bundled with nvidia-pytriton (Python backend); "
        "kserve: KServe's ModelServer over onnxruntime (default triton)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int, help="gRPC port (default: --port + 1)")
    _add_model_options(parser)
    _add_limits(parser)
    parser.add_argument(
        "--stub-site",
        type=Path,
        help="triton: folder with numpy<2 and onnxruntime for the Python stub "
        "(default $LAYERFUSE_TRITON_STUB or <venv>/triton-stub, made by scripts/setup.sh)",
    )
    parser.add_argument(
        "--keep-going",
        action="store_true",
        help="serve the models that load even if others fail (they are reported, not ready)",
    )
    parser.add_argument("--log-file", help="append the server's log here instead of stderr")
    parser.set_defaults(handler=_run)
