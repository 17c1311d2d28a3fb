"""OpenTelemetry tracing, off unless the standard OTEL_* variables configure an exporter.

On when OTEL_TRACES_EXPORTER names one (`otlp`, `console`, comma-separated) or an OTLP
endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT);
OTEL_SDK_DISABLED=true keeps it off. The SDK itself reads the rest: OTEL_SERVICE_NAME and
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), the OTLP exporter's endpoint, headers
and timeout (OTLP over HTTP/protobuf, port 4318). The console exporter writes each span as
JSON to stdout, which works offline.

Each request (REST: app/middleware.py; gRPC: app/rpc/service.py) is a server span that
continues the caller's trace when it sends a W3C `traceparent`, with child spans for reading
the body, decoding its images or tensors, waiting in the batch queue, the forward pass and
encoding the answer. Off, every hook is one `tracer is None` test: docs/operations.md has
the cost measured both ways.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, TypeVar

log = logging.getLogger("app.tracing")
tracer: Any = None  # an opentelemetry Tracer once configure() turned tracing on
_provider: Any = None
NULL = contextlib.nullcontext()
# perf_counter -> epoch nanoseconds, for spans timed by the batcher (app/batching.py) after the fact
_EPOCH_NS = time.time_ns() - time.perf_counter_ns()
F = TypeVar("F", bound=Callable[..., Any])


def exporters_configured(env: Mapping[str, str] = os.environ) -> list[str]:
    """The exporters the OTEL_* variables ask for; empty means tracing stays off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    named = [e.strip().lower() for e in env.get("OTEL_TRACES_EXPORTER", "").split(",") if e.strip()]
    if named:
        return [e for e in named if e != "none"]
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return ["otlp"]
    return []


def configure(service_version: str) -> bool:
    """Turn tracing on if the environment asks for it (once per process); True when on."""
    global tracer, _provider
    if tracer is not None:
        return True
    exporters = exporters_configured()
    if not exporters:
        return False
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    attributes = {SERVICE_VERSION: service_version}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attributes[SERVICE_NAME] = "mnist-vae-service"
    provider = TracerProvider(resource=Resource.create(attributes))  # reads OTEL_SERVICE_NAME, _RESOURCE_ATTRIBUTES
    for name in exporters:
        if name == "console":
            provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
        elif name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        else:
            log.warning("OTEL_TRACES_EXPORTER=%s: this service sends spans to otlp (HTTP/protobuf) or console only",
                        name)
    _provider, tracer = provider, provider.get_tracer("app")
    log.info("tracing on: %s", ", ".join(exporters))
    return True


def shutdown() -> None:
    """Send the spans still buffered (the OTLP exporter batches them)."""
    global tracer, _provider
    if _provider is not None:
        _provider.shutdown()
    tracer = _provider = None


@contextlib.contextmanager
def _grpc_span(service: str, method: str, metadata: Mapping[str, str]) -> Iterator[Any]:
    from opentelemetry.propagate import extract
    from opentelemetry.trace import SpanKind

    attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}
    with tracer.start_as_current_span(f"{service}/{method}", context=extract(metadata), kind=SpanKind.SERVER,
                                      attributes=attributes) as current:
        yield current


def grpc_span(service: str, method: str, metadata: Mapping[str, str]) -> contextlib.AbstractContextManager[Any]:
    """A gRPC call's own span, continuing the trace of the `traceparent` in its metadata (OpenTelemetry's
    RPC conventions: named `service/method`). HTTP requests get theirs from FastAPI (`fastapi_telemetry`)."""
    return NULL if tracer is None else _grpc_span(service, method, metadata)


def fastapi_telemetry() -> dict[str, Any]:
    """FastAPI's own telemetry (`FastAPI(telemetry=...)`): with tracing on, it makes each HTTP request a
    server span with OpenTelemetry's HTTP conventions (named by route, continuing the `traceparent`),
    on this module's provider; off, it is turned off whole, so that no request asks OpenTelemetry
    whether a provider is configured (2% of an in-process `/encode` when it did). Its metrics and logs
    stay off: Prometheus (app/metrics.py) and the access log say those."""
    off = {"metrics": False, "logs": False, "operation_spans": False, "auto_configure": False}
    return {**off, "tracing": False} if tracer is None else {**off, "tracer_provider": _provider}


def finish_request(request_id: str, grpc_status: Any = None) -> None:
    """What the request's span learns at its end: its request id; for a gRPC call, its status code
    (not OK marks it failed, as OpenTelemetry's RPC conventions say)."""
    from opentelemetry.trace import Status, StatusCode, get_current_span

    current = get_current_span()
    current.set_attribute("request.id", request_id)
    if grpc_status is not None:
        current.set_attribute("rpc.grpc.status_code", grpc_status.value[0])
        if grpc_status.name != "OK":
            current.set_status(Status(StatusCode.ERROR))


@contextlib.contextmanager
def _child(name: str) -> Iterator[Any]:
    # Not made the current span: nothing runs under it, and attaching a context costs as much as the span
    child = tracer.start_span(name)
    try:
        yield child
    finally:
        child.end()


def span(name: str) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one, or nothing when tracing is off."""
    return NULL if tracer is None else _child(name)


def traced(name: str) -> Callable[[F], F]:
    """A function (or coroutine function) run in a child span named `name`."""

    def wrap(fn: F) -> F:
        if inspect.iscoroutinefunction(fn):
            @functools.wraps(fn)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                if tracer is None:
                    return await fn(*args, **kwargs)
                with _child(name):
                    return await fn(*args, **kwargs)

            return run_async  # type: ignore[return-value]

        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            if tracer is None:
                return fn(*args, **kwargs)
            with _child(name):
                return fn(*args, **kwargs)

        return run  # type: ignore[return-value]

    return wrap


def batch_spans(method: str, enqueued: float, started: float, done: float, rows: int, requests: int) -> None:
    """The queue wait and the forward pass of one call, from the batcher's perf_counter times: the pass
    ran for a whole batch elsewhere (another task, the compute thread), so its span is made afterwards."""
    if tracer is None:
        return
    queued = tracer.start_span("queue", start_time=_ns(enqueued), attributes={"vae.method": method})
    queued.end(end_time=_ns(started))
    forward = tracer.start_span("forward pass", start_time=_ns(started),
                                attributes={"vae.method": method, "vae.batch.rows": rows,
                                            "vae.batch.requests": requests})
    forward.end(end_time=_ns(done))


def _ns(perf_counter_s: float) -> int:
    return _EPOCH_NS + int(perf_counter_s * 1e9)


def ids() -> dict[str, str]:
    """The current trace and span ids, for the access log; empty when tracing is off."""
    if tracer is None:
        return {}
    from opentelemetry.trace import get_current_span

    context = get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}
