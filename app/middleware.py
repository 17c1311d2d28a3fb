"""Pure-ASGI middleware (no per-request task switch, unlike BaseHTTPMiddleware).

- Request ids: echo the client's X-Request-ID or make one, put it on the response.
- Load limits: beyond `max_in_flight` model requests computing, or `max_receiving` uploads
  still arriving, answer 503 + Retry-After at once. A request computes once its body is in.
- Body limits: refuse bodies above the size limit with 413, by Content-Length before
  reading, or by counting the stream for chunked uploads; a body not in within
  `body_timeout_s` gets 408 and the connection is closed.
- Draining (SIGTERM, app/draining.py): every answer carries `Connection: close`.
- Access log: one JSON line per request with id, method, path, status, latency (and the trace
  and span ids while tracing).
- Tracing (app/tracing.py, when configured): FastAPI's own server span of the request gets the
  request id here.
- Unexpected exceptions: a JSON 500 that still carries the request id (Starlette's own
  500 handler runs outside every middleware, so its answers would not), and the
  traceback in the log.
- Start-up failures: the lifespan already logged one line naming the file and the
  fault; Starlette's traceback on top of it would only bury that line.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app import tracing
from app.errors import error_response_for, internal_error_response, is_protocol
from app.exceptions import BodyTooLarge, Overloaded, RequestTimeout, ServiceError
from app.metrics import Metrics

access_log = logging.getLogger("app.access")
# Never a 503 for load: probes, metrics scrapes and docs.
UNLIMITED = {"/healthz", "/readyz", "/models", "/metrics", "/docs", "/redoc", "/openapi.json", "/"}


@dataclass
class Drain:
    """Set on SIGTERM (app/draining.py): /readyz answers 503 and every answer carries
    `Connection: close`, so that clients and load balancers move off before the server stops."""

    draining: bool = False


@dataclass
class Slots:
    """Model requests computing, over REST and gRPC (app/rpc/service.py) together, against VAE_MAX_IN_FLIGHT."""

    limit: int = 256
    metrics: Metrics | None = None
    in_flight: int = 0

    def take(self) -> bool:
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        return True

    def release(self) -> None:
        self.in_flight -= 1
        if self.metrics is not None:
            self.metrics.in_flight.dec()

    def full(self) -> Overloaded:
        return Overloaded(f"{self.in_flight} requests in progress; the limit is {self.limit} (VAE_MAX_IN_FLIGHT)")


@dataclass(frozen=True)
class HttpLimits:
    max_body_bytes: int = 10 * 1024 * 1024
    max_in_flight: int = 256
    max_receiving: int = 1024
    body_timeout_s: float = 30.0


class ServiceMiddleware:
    """Which layer bounds what: uvicorn caps connections (VAE_MAX_CONNECTIONS, its
    limit_concurrency) and closes idle keep-alive ones; app/server.py bounds the request head
    (time and size); this middleware bounds everything after the head: the body's size and
    arrival time, uploads still arriving, and requests computing."""

    def __init__(self, app: ASGIApp, limits: HttpLimits, metrics: Metrics | None = None, drain: Drain | None = None,
                 slots: Slots | None = None) -> None:
        self.app, self.limits, self.metrics = app, limits, metrics
        self.drain = drain or Drain()
        # requests computing (their body, if any, is in), shared with the gRPC service
        self.slots = slots or Slots(limits.max_in_flight, metrics)
        self.receiving = 0  # requests whose body is still arriving
        # The uploads' deadlines, checked by one sweep (every quarter of the timeout, at most a
        # second) rather than a timer per request, which under load costs more than the check.
        self.deadlines: dict[asyncio.Task[Any], float] = {}
        self.expired: set[asyncio.Task[Any]] = set()
        self.sweeping = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, _quiet_startup_failure(send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        limits = self.limits
        headers = dict(scope["headers"])
        rid = headers.get(b"x-request-id", b"").decode("latin-1")[:128] or os.urandom(16).hex()  # uuid4: 3x the cost
        status = 500
        started = False
        extra_headers = [(b"x-request-id", rid.encode("latin-1"))]

        async def send_with_id(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if tracing.tracer is not None:  # FastAPI's span of the request ends with its answer
                    tracing.finish_request(rid)
                more = [*extra_headers, (b"connection", b"close")] if self.drain.draining else extra_headers
                message["headers"] = [*message.get("headers", ()), *more]
            await send(message)

        async def refuse(error: ServiceError) -> None:
            await error_response_for(path, error)(scope, receive, send_with_id)
            self._done(scope, rid, status, start)

        path = scope["path"]
        # Protocol GETs are health and metadata: probes, never refused either.
        limited = path not in UNLIMITED and not (scope["method"] == "GET" and is_protocol(path))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limits.max_body_bytes:
            await refuse(BodyTooLarge(f"{int(length)} bytes; the limit is {limits.max_body_bytes} "
                                      "(VAE_MAX_BODY_BYTES)"))
            return
        # A compute slot is taken once the body is in: a slow upload holds only a receiving slot,
        # and never stops a fast request from being served.
        uploading = limited and ((length is not None and length != b"0") or b"transfer-encoding" in headers)
        if uploading and self.receiving >= limits.max_receiving:
            await refuse(Overloaded(f"{self.receiving} uploads still arriving; the limit is {limits.max_receiving} "
                                    "(VAE_MAX_RECEIVING)"))
            return
        if limited and not uploading and not self.slots.take():
            await refuse(self.slots.full())
            return
        computing = limited and not uploading
        self.receiving += uploading
        task = asyncio.current_task()
        if uploading and task is not None:
            self.deadlines[task] = time.monotonic() + limits.body_timeout_s
            if not self.sweeping:
                self.sweeping = True
                asyncio.get_running_loop().call_later(self._sweep_interval(), self._sweep)
        received = 0

        async def counting_receive() -> Message:
            nonlocal received, uploading, computing
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limits.max_body_bytes:
                    raise BodyTooLarge(f"more than {limits.max_body_bytes} bytes; the limit is "
                                       f"{limits.max_body_bytes} (VAE_MAX_BODY_BYTES)")
                if message.get("more_body", False):
                    return message
            if uploading:  # the whole body is in, or the client left
                uploading = False
                self.receiving -= 1
                self.deadlines.pop(task, None)  # type: ignore[arg-type]
                if message["type"] == "http.request":  # from receiving to computing
                    if not self.slots.take():
                        raise self.slots.full()
                    computing = True
            return message

        try:
            await self.app(scope, counting_receive, send_with_id)
        except asyncio.CancelledError:
            if task not in self.expired:
                raise
            self.expired.discard(task)  # type: ignore[arg-type]
            task.uncancel()  # type: ignore[union-attr]
            extra_headers.append((b"connection", b"close"))  # the rest of the body is never read
            if not started:
                await error_response_for(path, RequestTimeout(
                    f"the body did not arrive within {limits.body_timeout_s:g} s ({received} bytes came; "
                    "VAE_BODY_TIMEOUT_S)"))(scope, receive, send_with_id)
        except ClientDisconnect:  # the client left before sending its whole body: nobody to answer, no fault here
            status = 499  # nginx's code for it, in the access log and metrics
        except Exception as e:
            if started:  # too late for an error answer; the server closes the connection
                raise
            response = error_response_for(path, e) if isinstance(e, ServiceError) else internal_error_response(e)
            await response(scope, receive, send_with_id)
        finally:
            if uploading:
                self.deadlines.pop(task, None)  # type: ignore[arg-type]
                self.expired.discard(task)  # type: ignore[arg-type]
            self.receiving -= uploading
            if computing:
                self.slots.release()
            self._done(scope, rid, status, start)

    def _sweep_interval(self) -> float:
        return min(1.0, self.limits.body_timeout_s / 4)

    def _sweep(self) -> None:
        """Cancel the uploads past their deadline (each answers 408); again later while any are left."""
        now = time.monotonic()
        for task, deadline in list(self.deadlines.items()):
            if now > deadline:
                del self.deadlines[task]
                self.expired.add(task)
                task.cancel()
        if self.deadlines:
            asyncio.get_running_loop().call_later(self._sweep_interval(), self._sweep)
        else:
            self.sweeping = False

    def _done(self, scope: Scope, rid: str, status: int, start: float) -> None:
        route = getattr(scope.get("route"), "path", "unmatched")  # set by the router; none for a 404
        if self.metrics is not None:
            self.metrics.observe_request(route, scope.get("state", {}).get("model", ""), status,
                                         time.perf_counter() - start)
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
        if tracing.tracer is not None:
            record.update(tracing.ids())
        access_log.info(json.dumps(record), extra={"access": record})


def _quiet_startup_failure(send: Send) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "lifespan.startup.failed":
            message = {**message, "message": ""}
        await send(message)

    return wrapped

