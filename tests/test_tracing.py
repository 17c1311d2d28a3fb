"""Tracing (app/tracing.py) and JSON logs (app/logs.py): a caller's `traceparent` is continued over REST and
gRPC with a span for each stage, the access log carries the trace id, and `vae-serve` configured by the
standard OTEL_* variables alone writes spans (the console exporter, offline)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from app import logs, tracing
from app.main import create_app
from tests.conftest import REPO, free_port
from tests.test_api import settings
from tests.test_grpc import Stub, encode_request
from tests.test_protocol import PNGS

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@pytest.mark.parametrize(("env", "exporters"), [
    ({}, []),
    ({"OTEL_TRACES_EXPORTER": "console"}, ["console"]),
    ({"OTEL_TRACES_EXPORTER": "otlp, console"}, ["otlp", "console"]),
    ({"OTEL_TRACES_EXPORTER": "none"}, []),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"}, ["otlp"]),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"}, ["otlp"]),
    ({"OTEL_TRACES_EXPORTER": "console", "OTEL_SDK_DISABLED": "true"}, []),
])
def test_tracing_is_on_only_when_the_otel_variables_say(env: dict[str, str], exporters: list[str]) -> None:
    assert tracing.exporters_configured(env) == exporters


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_provider", provider)
    yield exporter


def tree(exporter: InMemorySpanExporter, root_name: str) -> tuple[object, list[str]]:
    """The request's span (a child of the caller's) and the names of its children, by start time."""
    finished = exporter.get_finished_spans()
    root = next(s for s in finished if s.name == root_name)
    assert f"{root.context.trace_id:032x}" == TRACE_ID and f"{root.parent.span_id:016x}" == PARENT_ID
    children = sorted((s for s in finished if s.parent is not None and s.parent.span_id == root.context.span_id),
                      key=lambda s: s.start_time)
    assert all(s.context.trace_id == root.context.trace_id for s in children)
    return root, [s.name for s in children]


def test_a_rest_request_continues_the_trace_with_a_span_per_stage(
        models_dir: Path, spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(create_app(settings(models_dir))) as client, caplog.at_level(logging.INFO, "app.access"):
        answer = client.post("/encode", files={"file": ("d.png", PNGS[0], "image/png")},
                             headers={"traceparent": TRACEPARENT, "x-request-id": "t-1"})
        assert answer.status_code == 200
        root, children = tree(spans, "POST /encode")  # FastAPI's own server span, named by route
        assert children == ["read body", "decode images", "queue", "forward pass", "encode answer"]
        assert root.attributes["request.id"] == "t-1" and root.attributes["http.response.status_code"] == 200
        assert root.attributes["http.route"] == "/encode"
        forward = next(s for s in spans.get_finished_spans() if s.name == "forward pass")
        assert forward.attributes["vae.method"] == "encode" and forward.attributes["vae.batch.rows"] == 1
        record = next(r.access for r in caplog.records if getattr(r, "access", {}).get("request_id") == "t-1")
        assert record["trace_id"] == TRACE_ID and record["span_id"] == f"{root.context.span_id:016x}"
        spans.clear()
        client.post("/v2/models/vae.encode/infer", json={"inputs": []}, headers={"traceparent": TRACEPARENT})
        root, children = tree(spans, "POST /v2/models/{model_name}/infer")
        assert children == ["read body", "decode tensors"] and root.attributes["http.response.status_code"] == 400
    spans.clear()
    tracing.tracer = None  # as in a process whose OTEL_* variables ask for nothing (monkeypatch restores it)
    with TestClient(create_app(settings(models_dir))) as client:
        client.post("/encode", files={"file": ("d.png", PNGS[0], "image/png")}, headers={"traceparent": TRACEPARENT})
    assert spans.get_finished_spans() == ()  # no span, FastAPI's included


def test_a_grpc_call_continues_the_trace(models_dir: Path, spans: InMemorySpanExporter) -> None:
    port = free_port()
    with TestClient(create_app(settings(models_dir, grpc_port=port))), \
            grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        Stub(channel)("ModelInfer", encode_request(), (("traceparent", TRACEPARENT),))
        root, children = tree(spans, "inference.GRPCInferenceService/ModelInfer")
        assert children == ["decode tensors", "queue", "forward pass", "encode answer"]
        assert (root.attributes["rpc.system"], root.attributes["rpc.grpc.status_code"]) == ("grpc", 0)


def test_json_log_lines_put_an_access_records_fields_at_the_top() -> None:
    record = logging.LogRecord("app.access", logging.INFO, __file__, 1, "ignored", None, None)
    record.access = {"request_id": "r", "status": 200, "trace_id": TRACE_ID}
    line = json.loads(logs.JsonFormatter().format(record))
    assert {k: line[k] for k in ("level", "logger", "request_id", "status", "trace_id")} == {
        "level": "info", "logger": "app.access", "request_id": "r", "status": 200, "trace_id": TRACE_ID}
    plain = logging.LogRecord("app", logging.WARNING, __file__, 1, "model %s refused", ("x",), None)
    assert json.loads(logs.JsonFormatter().format(plain))["message"] == "model x refused"


@pytest.mark.slow
def test_vae_serve_traces_to_the_console_and_logs_json_by_settings_alone(models_dir: Path) -> None:
    port = free_port()
    env = {**os.environ, "VAE_MODELS_DIR": str(models_dir), "VAE_PORT": str(port), "VAE_LOG_FORMAT": "json",
           "VAE_DRAIN_DELAY_S": "0", "OTEL_TRACES_EXPORTER": "console", "OTEL_SERVICE_NAME": "vae-under-test"}
    proc = subprocess.Popen([sys.executable, "-m", "app.cli"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        answer = httpx.post(f"http://127.0.0.1:{port}/encode", content=PNGS[0],
                            headers={"content-type": "image/png", "traceparent": TRACEPARENT})
        assert answer.status_code == 200
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
    assert f'"trace_id": "0x{TRACE_ID}"' in out and '"name": "forward pass"' in out
    assert '"service.name": "vae-under-test"' in out
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    access = [line for line in lines if line.get("logger") == "app.access" and line.get("path") == "/encode"]
    assert access and access[0]["trace_id"] == TRACE_ID and access[0]["status"] == 200
    assert any(line.get("logger", "").startswith("uvicorn") for line in lines)  # uvicorn's own lines too
