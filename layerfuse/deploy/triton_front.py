"""The HTTP and gRPC listeners ``layerfuse serve`` puts before tritonserver.

Why a front: tritonserver 2.51 sizes its buffers from a request's declared shape before it
reads the data. One HTTP request declaring ``[65536, 65536]`` aborts the server (bad_alloc),
``[2^31, 2^31]`` segfaults it, ``[1, 2^31]`` gets it OOM-killed; nothing in ``config.pbtxt``
bounds a variable dimension, and 2.51 has no request-size option. Over gRPC and binary HTTP
its byte-size check wraps at 2^64, so ``[8, 2^61]`` with no data reaches the Python stub,
whose C++ side builds the numpy array before ``execute`` runs, and the stub dies. So
tritonserver listens on private loopback ports and every request passes through here first:

- infer requests are checked (:mod:`layerfuse.deploy.request_checks`) and refused with 400 /
  INVALID_ARGUMENT naming the input; bodies over ``max_body`` bytes get 413 /
  RESOURCE_EXHAUSTED; malformed JSON gets 400 instead of tritonserver's 500;
- readiness (``/v2/health/ready``, ``/v2/models/NAME/ready``, ``ServerReady``, ``ModelReady``)
  also asks :class:`~layerfuse.deploy.stub_watch.StubWatch`, so a dead stub is not ready;
- everything else is relayed unchanged, bytes in and bytes out.
"""

from __future__ import annotations

__all__ = ["TritonFront"]

import http.client
import json
import re
import socket
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import grpc

from layerfuse.deploy.request_checks import check_grpc_request, check_http_request, decode_body
from layerfuse.deploy.stub_watch import StubWatch
from layerfuse.deploy.tensor_checks import RequestError

_INFER = re.compile(r"^/v2/models/[^/]+(/versions/[^/]+)?/infer$")
_MODEL_READY = re.compile(r"^/v2/models/([^/]+)(/versions/[^/]+)?/ready$")
# Answered here (the body is read before it is relayed), so never passed on.
_HOP_HEADERS = {
    "connection", "keep-alive", "transfer-encoding", "content-length", "host", "expect",
}  # fmt: skip
_SERVICE = "/inference.GRPCInferenceService/"


class _Http(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    front: TritonFront

    def log_message(self, format, *args) -> None:
        pass

    def _answer(self, status: int, payload: bytes, headers: list[tuple[str, str]]) -> None:
        self.send_response(status)
        for key, value in headers:
            if key.lower() not in _HOP_HEADERS:
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self._answer(status, body, [("Content-Type", "application/json")])

    def _relay(self, body: bytes | None) -> None:
        """Pass the request on over this thread's keep-alive connection; tritonserver may have
        closed an idle one, so a failure is retried once on a fresh connection."""
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_HEADERS}
        for attempt in (1, 2):
            upstream = self.front.upstream_connection()
            try:
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                payload = response.read()
                break
            except (OSError, http.client.HTTPException) as exc:
                upstream.close()
                if attempt == 2:
                    self._error(503, f"tritonserver is not answering: {exc}")
                    return
        self._answer(response.status, payload, response.getheaders())

    def _body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            self._error(411, "send the request with a Content-Length, not chunked")
            return None
        length = self.headers.get("Content-Length", "0")
        if not length.isdigit():
            self.close_connection = True
            self._error(400, "Content-Length must be a whole number")
            return None
        if int(length) > self.front.max_body:
            self.close_connection = True  # the body stays unread
            self._error(413, f"request body exceeds {self.front.max_body} bytes")
            return None
        return self.rfile.read(int(length))

    def do_GET(self) -> None:
        if self.front.not_ready(self.path):
            self._error(503, "not ready: a model's Python stub died and is being reloaded")
            return
        self._relay(None)

    def do_POST(self) -> None:
        body = self._body()
        if body is None:
            return
        if _INFER.match(self.path.split("?", 1)[0]):
            try:
                plain = decode_body(
                    body, self.headers.get("Content-Encoding", "").lower(), self.front.max_body
                )
                check_http_request(
                    plain,
                    self.headers.get("Inference-Header-Content-Length"),
                    self.front.max_elements,
                )
            except RequestError as exc:
                self._error(400, str(exc))
                return
        self._relay(body)


class _Grpc(grpc.GenericRpcHandler):
    """Relays every GRPCInferenceService method as bytes; checks ModelInfer(Stream) requests."""

    def __init__(self, front: TritonFront) -> None:
        self.front = front

    def service(self, details):
        if not details.method.startswith(_SERVICE):
            return None
        name = details.method.removeprefix(_SERVICE)
        if name == "ModelStreamInfer":
            return grpc.stream_stream_rpc_method_handler(self._stream(details.method))
        return grpc.unary_unary_rpc_method_handler(self._unary(details.method, name))

    def _unary(self, method: str, name: str):
        call = self.front.channel.unary_unary(method)

        def handle(raw: bytes, context):
            if name == "ModelInfer":
                try:
                    check_grpc_request(raw, self.front.max_elements)
                except RequestError as exc:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            if name in ("ServerReady", "ModelReady") and self.front.stub_failed(raw, name):
                from tritonclient.grpc import service_pb2

                answer = getattr(service_pb2, f"{name}Response")(ready=False)
                return answer.SerializeToString()
            try:
                return call(raw, metadata=_metadata(context), timeout=_timeout(context))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())

        return handle

    def _stream(self, method: str):
        call = self.front.channel.stream_stream(method)

        def handle(requests, context):
            refused: list[str] = []

            def checked():
                for raw in requests:
                    try:
                        check_grpc_request(raw, self.front.max_elements)
                    except RequestError as exc:
                        refused.append(str(exc))
                        return
                    yield raw

            try:
                yield from call(checked(), metadata=_metadata(context), timeout=_timeout(context))
            except grpc.RpcError as exc:
                context.abort(exc.code(), exc.details())
            if refused:
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused[0])

        return handle


def _timeout(context) -> float | None:
    """The caller's deadline; without one grpc reports ~9e18 s, which as a timeout expires."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e9 else None


def _metadata(context) -> tuple:
    """The caller's metadata without the transport's own entries."""
    return tuple(
        (key, value)
        for key, value in context.invocation_metadata()
        if not key.startswith((":", "grpc-")) and key not in ("user-agent", "content-type")
    )


class TritonFront:
    """Listens on the user's ports and relays to tritonserver on ``upstream_*`` (loopback)."""

    def __init__(
        self,
        host: str,
        http_port: int,
        grpc_port: int,
        upstream_http: int,
        upstream_grpc: int,
        *,
        max_elements: int,
        max_body: int,
        stubs: StubWatch,
    ) -> None:
        self.max_elements, self.max_body, self.stubs = max_elements, max_body, stubs
        self.upstream_http = upstream_http
        self._local = threading.local()
        handler = type("Handler", (_Http,), {"front": self})
        family_host = host.strip("[]")
        family = socket.AF_INET6 if ":" in family_host else socket.AF_INET
        # A listen backlog like tritonserver's, not http.server's 5 (bursts of clients).
        settings = {"address_family": family, "request_queue_size": 1024}
        server = type("Server", (ThreadingHTTPServer,), settings)
        self._http = server((family_host, http_port), handler)
        self._http.daemon_threads = True
        self.channel = grpc.insecure_channel(
            f"127.0.0.1:{upstream_grpc}",
            options=[("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)],
        )
        self._grpc = grpc.server(
            futures.ThreadPoolExecutor(max_workers=16),
            handlers=[_Grpc(self)],
            options=[("grpc.max_receive_message_length", max_body)],
        )
        address = f"[{family_host}]" if ":" in family_host else family_host
        self._grpc.add_insecure_port(f"{address}:{grpc_port}")
        self._thread: threading.Thread | None = None

    def upstream_connection(self) -> http.client.HTTPConnection:
        """This thread's keep-alive connection to tritonserver."""
        connection = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection("127.0.0.1", self.upstream_http)
            self._local.connection = connection
        return connection

    def not_ready(self, path: str) -> bool:
        """A readiness probe that must say no because a stub is dead (or reloading)."""
        path = path.split("?", 1)[0]
        match = _MODEL_READY.match(path)
        if path != "/v2/health/ready" and not match:
            return False
        dead = self.stubs.dead_models()
        return bool(dead) and (match is None or match.group(1) in dead)

    def stub_failed(self, raw: bytes, method: str) -> bool:
        """The gRPC twin of :meth:`not_ready` for ServerReady / ModelReady."""
        dead = self.stubs.dead_models()
        if not dead or method == "ServerReady":
            return bool(dead)
        from tritonclient.grpc import service_pb2

        return service_pb2.ModelReadyRequest.FromString(raw).name in dead

    def start(self) -> TritonFront:
        self._grpc.start()
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._grpc.stop(grace=None)
        self.channel.close()
