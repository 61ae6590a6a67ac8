"""KServe's ``ModelServer`` over layerfuse models: ``python -m layerfuse.deploy.kserve_server``.

``layerfuse serve --engine kserve`` starts this module as its child. KServe 0.21 needs five
adjustments to be a well-behaved server, each made here and nowhere else:

1. It binds ``0.0.0.0`` and ``[::]`` unconditionally: the REST host is set on uvicorn's config
   before serving, and the gRPC listener address is rewritten to ``--host``.
2. ``kserve.model_server`` parses ``sys.argv`` when imported: it is imported with ours hidden.
3. Request bodies are unbounded: an ASGI middleware answers 413 above ``--max-body-bytes``
   (by Content-Length, or by counting a streamed body) and gRPC gets the same receive limit
   (RESOURCE_EXHAUSTED).
4. tritonclient sends pure-JSON infer bodies without a JSON Content-Type, which KServe then
   reads as binary (400 "inference-header-content-length header is missing"): a middleware
   supplies the missing type. Malformed JSON gets 400 with the parser's complaint instead of
   FastAPI's 422 schema dump.
5. It has no repository index: ``POST /v2/repository/index`` answers as Triton's does
   (name, version, state, reason), so a model that failed to load is visible, with its reason,
   on both engines.
"""

from __future__ import annotations

__all__ = ["main"]

import argparse
import json
import logging
import sys
import types
import warnings


class BodyLimit:
    """ASGI middleware: 413 for request bodies over ``limit`` bytes."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"0")
        if declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge:
            await self._reject(send)

    async def _reject(self, send) -> None:
        body = json.dumps({"error": f"request body exceeds {self.limit} bytes"}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


class JsonByDefault:
    """ASGI middleware: a POST without a binary-header length is JSON."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = dict(scope["headers"])
            binary = b"inference-header-content-length" in headers
            if not binary and b"json" not in headers.get(b"content-type", b""):
                headers[b"content-type"] = b"application/json"
                scope = {**scope, "headers": list(headers.items())}
        await self.app(scope, receive, send)


def _bind_grpc(host: str) -> None:
    import kserve.protocol.grpc.server as grpc_server
    from grpc import aio

    address = f"[{host}]" if ":" in host else host

    def server(*args, **kwargs):
        instance = aio.server(*args, **kwargs)
        add_port = instance.add_insecure_port
        instance.add_insecure_port = lambda listen: add_port(listen.replace("[::]", address, 1))
        return instance

    grpc_server.aio = types.SimpleNamespace(server=server)


def _index_route(app, models) -> None:
    @app.post("/v2/repository/index")
    async def repository_index():
        return [
            {"name": m.name, "version": "1", "state": "READY"}
            if m.ready
            else {"name": m.name, "version": "1", "state": "UNAVAILABLE", "reason": m.error}
            for m in models
        ]


def _input_named(body: object, location: list) -> str:
    """``input 'NAME' shape: `` when a schema error lies inside ``inputs[i]`` of ``body``, so
    the error names the input as every other refusal does."""
    if "inputs" not in location or len(location) < location.index("inputs") + 2:
        return ""
    index = location[location.index("inputs") + 1]
    try:
        name = body["inputs"][index]["name"]
    except (KeyError, IndexError, TypeError):
        return ""
    field = " ".join(str(part) for part in location[location.index("inputs") + 2 :])
    return f"input '{name}' {field}: " if field else f"input '{name}': "


def _configure_app(app, models, limit: int) -> None:
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse

    async def malformed(request, exc):
        first = (exc.errors() or [{}])[0]
        reason = first.get("msg", "does not match the v2 inference request schema")
        where = _input_named(exc.body, list(first.get("loc", ())))
        return JSONResponse(
            status_code=400, content={"error": f"malformed request: {where}{reason}"}
        )

    app.add_exception_handler(RequestValidationError, malformed)
    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit, limit=limit)  # added last: runs first
    _index_route(app, models)


def _quiet_request_logs() -> None:
    """One log line per request (access log, timings, gRPC method) would drown the server's
    own messages under load; Triton does not log requests either. Called after kserve has
    configured logging, which would reset earlier levels."""
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    logging.getLogger("kserve").addFilter(
        lambda record: not str(record.msg).startswith("grpc method:")
    )
    warnings.filterwarnings("ignore", module="fastapi")


def _load(args) -> list:
    from layerfuse.deploy.kserve_model import OnnxModel

    models = []
    for item in args.models:
        name, path = item.split("=", 1)
        model = OnnxModel(
            name,
            path,
            provider=args.provider,
            threads=args.threads,
            max_input_elements=args.max_input_elements,
        )
        try:
            model.load()
        except Exception as exc:
            model.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
            print(f"layerfuse: model '{name}' failed to load: {model.error}", file=sys.stderr)
        models.append(model)
    return models


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="KServe ModelServer over ONNX models")
    parser.add_argument("models", nargs="+", help="NAME=PATH.onnx")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--max-body-bytes", type=int, required=True)
    parser.add_argument("--max-input-elements", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--provider", default="cpu")
    parser.add_argument("--grace-seconds", type=int, default=10)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    sys.argv = sys.argv[:1]
    import kserve
    from kserve import model_server

    models = _load(args)
    ready = [model for model in models if model.ready]
    if not ready:
        first = models[0]
        print(f"layerfuse: error: no model loaded ('{first.name}': {first.error})", file=sys.stderr)
        return 2

    class Server(kserve.ModelServer):
        def setup_event_loop(self):
            # start() has built the REST server by now; uvicorn reads the host when it binds.
            self._rest_server.config.host = args.host
            super().setup_event_loop()

    _configure_app(model_server.app, models, args.max_body_bytes)
    _bind_grpc(args.host)
    model_server.args.grpc_max_receive_message_length = args.max_body_bytes
    server = Server(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        grace_period=args.grace_seconds,
        enable_docs_url=False,
        enable_latency_logging=False,
    )
    _quiet_request_logs()
    for model in models:
        if not model.ready:
            server.register_model(model)
    server.start(ready)
    return 0


if __name__ == "__main__":
    sys.exit(main())
