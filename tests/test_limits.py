"""Overload and time limits: refuse at once rather than queue without bound or hang."""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from app.main import create_app
from app.middleware import ServiceMiddleware
from app.settings import Settings
from tests.conftest import TEST_DATA

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()


def test_requests_beyond_in_flight_limit_get_503_at_once() -> None:
    release = asyncio.Event()

    async def slow_app(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = ServiceMiddleware(slow_app, max_body_bytes=1000, max_in_flight=2)

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            held = [asyncio.create_task(client.post("/encode")) for _ in range(2)]
            await asyncio.sleep(0.05)
            refused = await asyncio.wait_for(client.post("/encode"), 1.0)  # answered while two are held
            probe = asyncio.create_task(client.get("/healthz"))  # probes are never refused for load
            await asyncio.sleep(0.05)
            release.set()
            return [*(await asyncio.gather(*held)), refused, await probe]

    first, second, refused, probe = asyncio.run(main())
    assert first.status_code == second.status_code == probe.status_code == 200
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"] == "overloaded"
    assert app.in_flight == 0


def test_compute_timeout_answers_504(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", request_timeout_s=1e-9)
    with TestClient(create_app(settings)) as client:
        r = client.post("/anomaly-score?k=256", content=DIGIT, headers={"content-type": "image/png"})
        assert r.status_code == 504 and r.json()["error"] == "compute timeout"
        assert client.get("/readyz").status_code == 200  # the service itself carries on


def test_cuda_without_gpu_falls_back_to_cpu(models_dir: Path, caplog) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", device="cuda")
    with TestClient(create_app(settings)) as client:
        devices = {m["device"] for m in client.get("/models").json()["models"]}
    if devices == {"cpu"}:  # on a GPU machine the setting is simply honoured
        assert any("falling back to CPU" in r.getMessage() for r in caplog.records)
    else:
        assert devices == {"cuda:0"} or devices == {"cuda"}


def test_hostile_bodies_are_refused_without_reading_or_decoding_them(models_dir: Path) -> None:
    """A 50 MB body and a PNG declaring 100,000 x 100,000 pixels: refused before any allocation of that size."""
    from tests.test_api import bomb_png

    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as client:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        big = client.post("/encode", content=b"\0" * (50 * 1024 * 1024), headers={"content-type": "image/png"})
        bomb = client.post("/encode", content=bomb_png(100_000, 100_000), headers={"content-type": "image/png"})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert big.status_code == 413 and bomb.status_code == 413
    # The test client itself holds the 50 MB body (and a copy); the service adds nothing near 10 GB of pixels.
    assert (after - before) / 1024 < 200
