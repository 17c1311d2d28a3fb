"""SIGTERM and what operators read, in-process and fast: readiness while draining, a second SIGTERM,
and the latency histogram's unit (until now only the slow SIGTERM and metrics tests saw these)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
import types
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import app.middleware
from app.draining import drain_on_sigterm
from app.main import create_app
from app.metrics import Metrics
from app.middleware import Drain, HttpLimits, ServiceMiddleware
from app.settings import Settings


def test_readiness_says_503_while_draining_and_every_answer_closes(models_dir: Path) -> None:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as client:
        assert client.get("/readyz").status_code == 200 and client.get("/v2/health/ready").status_code == 200
        client.app.state.drain.draining = True  # what the first SIGTERM sets
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"] == "not ready" and "SIGTERM" in r.json()["detail"]
        assert r.headers["connection"] == "close"
        ready = client.get("/v2/health/ready")
        assert ready.status_code == 503 and ready.json() == {"ready": False}
        assert client.get("/healthz").status_code == 200  # alive all the same: no restart
        client.app.state.drain.draining = False


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="signals need the main thread")
def test_the_first_sigterm_drains_and_a_second_ends_the_drain_at_once() -> None:
    calls: list[float] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: calls.append(time.monotonic()))
    drain = Drain()
    try:
        with drain_on_sigterm(drain, delay_s=30.0):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert drain.draining and calls == []  # draining: the server is told only after the delay
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            assert len(calls) == 1  # a second SIGTERM: the server stops now, not 30 s from now
            time.sleep(0.2)
            assert len(calls) == 1  # and exactly once: no new drain was started either
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_the_latency_histogram_is_in_seconds() -> None:
    """A request that takes exactly 0.25 s (a clock that says so) is observed as 0.25, in the 0.25 bucket."""
    ticks = iter([100.0, 100.25, 100.25, 100.25])
    fake_time = types.SimpleNamespace(perf_counter=lambda: next(ticks), monotonic=time.monotonic)
    metrics = Metrics()

    async def ok(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    async def send(message: dict) -> None:
        pass

    mw = ServiceMiddleware(ok, HttpLimits(), metrics=metrics)
    scope = {"type": "http", "method": "GET", "path": "/healthz", "headers": [], "query_string": b""}
    real_time = app.middleware.time
    app.middleware.time = fake_time  # type: ignore[assignment]
    try:
        asyncio.run(mw(scope, receive, send))
    finally:
        app.middleware.time = real_time
    sample = {(s.name, s.labels.get("le")): s.value for m in metrics.registry.collect() for s in m.samples
              if s.name.startswith("vae_request_duration_seconds")}
    assert sample[("vae_request_duration_seconds_sum", None)] == 0.25
    assert sample[("vae_request_duration_seconds_bucket", "0.1")] == 0
    assert sample[("vae_request_duration_seconds_bucket", "0.25")] == 1
