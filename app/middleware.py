"""Pure-ASGI middleware (no per-request task switch, unlike BaseHTTPMiddleware).

- Request ids: echo the client's X-Request-ID or make one, put it on the response.
- Load limit: beyond `max_in_flight` model requests, answer 503 + Retry-After at once.
- Body limit: refuse bodies above the limit with 413, by Content-Length before
  reading, or by counting the stream for chunked uploads.
- Access log: one JSON line per request with id, method, path, status, latency.
- Unexpected exceptions: a JSON 500 that still carries the request id (Starlette's own
  500 handler runs outside every middleware, so its answers would not), and the
  traceback in the log.
- Start-up failures: the lifespan already logged one line naming the file and the
  fault; Starlette's traceback on top of it would only bury that line.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import error_response_for, internal_error_response, is_protocol
from app.exceptions import BodyTooLarge, Overloaded, ServiceError
from app.metrics import Metrics

access_log = logging.getLogger("app.access")
# Never a 503 for load: probes, metrics scrapes and docs.
UNLIMITED = {"/healthz", "/readyz", "/models", "/metrics", "/docs", "/redoc", "/openapi.json", "/"}


class ServiceMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, max_in_flight: int, metrics: Metrics | None = None) -> None:
        self.app, self.max_body_bytes, self.max_in_flight = app, max_body_bytes, max_in_flight
        self.metrics = metrics
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _quiet_startup_failure(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        status = 500
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode("latin-1"))]
            await send(message)

        path = scope["path"]
        # Protocol GETs are health and metadata: probes, never refused either.
        limited = path not in UNLIMITED and not (scope["method"] == "GET" and is_protocol(path))
        if limited and self.in_flight >= self.max_in_flight:
            await error_response_for(path, Overloaded(f"{self.in_flight} requests in progress; the limit is "
                                                    f"{self.max_in_flight} (VAE_MAX_IN_FLIGHT)"))(scope, receive,
                                                                                                  send_with_id)
            self._done(scope, rid, status, start)
            return

        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await error_response_for(path, BodyTooLarge(f"{int(length)} bytes; the limit is {self.max_body_bytes} "
                                                      "(VAE_MAX_BODY_BYTES)"))(scope, receive, send_with_id)
            self._done(scope, rid, status, start)
            return

        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    raise BodyTooLarge(f"more than {self.max_body_bytes} bytes; the limit is {self.max_body_bytes} "
                                       "(VAE_MAX_BODY_BYTES)")
            return message

        self.in_flight += limited
        if limited and self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, counting_receive, send_with_id)
        except Exception as e:
            if started:  # too late for an error answer; the server closes the connection
                raise
            response = error_response_for(path, e) if isinstance(e, ServiceError) else internal_error_response(e)
            await response(scope, receive, send_with_id)
        finally:
            self.in_flight -= limited
            if limited and self.metrics is not None:
                self.metrics.in_flight.dec()
            self._done(scope, rid, status, start)

    def _done(self, scope: Scope, rid: str, status: int, start: float) -> None:
        if self.metrics is not None:
            route = scope.get("route")  # set by the router; none for a 404 (no unbounded label values)
            self.metrics.observe_request(getattr(route, "path", "unmatched"),
                                         scope.get("state", {}).get("model", ""), status, time.perf_counter() - start)
        if not access_log.isEnabledFor(logging.INFO):
            return
        record: dict[str, Any] = {
            "request_id": rid, "method": scope["method"], "path": scope["path"],
            "query": scope.get("query_string", b"").decode("latin-1"), "status": status,
            "latency_ms": round((time.perf_counter() - start) * 1000, 2),
        }
        model = scope.get("state", {}).get("model")
        if model:
            record["model"] = model
        access_log.info(json.dumps(record))


def _quiet_startup_failure(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "lifespan.startup.failed":
            message = {**message, "message": ""}
        await send(message)

    return wrapped
