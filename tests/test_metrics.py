"""GET /metrics: Prometheus text format, counts that match the traffic, also summed over workers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from app.main import create_app
from app.settings import Settings
from tests.conftest import REPO, TEST_DATA, vae_serve

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
PNG = {"content-type": "image/png"}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_metrics_count_requests_passes_and_batches(models_dir: Path) -> None:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as client:
        before = client.get("/metrics").text
        for _ in range(5):
            assert client.post("/encode", content=DIGIT, headers=PNG).status_code == 200
        files = [("file", (f"{i}.png", DIGIT, "image/png")) for i in range(3)]
        client.post("/anomaly-score?model=deep-tiny&k=8", files=files)
        client.post("/anomaly-score?k=8", files=files[:2])  # vae's fitted score: its own method label
        client.post("/decode", json={"z": [[0.0, 0.0]]})
        client.post("/reconstruct", content=DIGIT, headers=PNG)
        client.get("/sample?n=300")  # 413
        client.get("/no-such-page")
        r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    grew = value(text, "vae_requests_total", endpoint="/encode", model="vae", status="200") - value(
        before, "vae_requests_total", endpoint="/encode", model="vae", status="200")
    assert grew == 5
    assert value(text, "vae_requests_total", endpoint="/sample", model="vae", status="413") == 1
    assert value(text, "vae_requests_total", endpoint="unmatched", model="", status="404") == 1  # no label per path
    assert value(text, "vae_request_duration_seconds_count", endpoint="/encode") == 5
    assert 0 < value(text, "vae_request_duration_seconds_sum", endpoint="/encode") < 30  # seconds, not a clock reading
    encode = {"model": "vae", "method": "encode"}
    assert value(text, "vae_inferences_total", **encode) == 5
    assert 1 <= value(text, "vae_forward_passes_total", **encode) <= 5
    assert value(text, "vae_queue_seconds_count", **encode) == 5
    assert 0 <= value(text, "vae_queue_seconds_sum", **encode) < 5  # waits, in seconds
    scored = {"model": "deep-tiny", "method": "log_likelihood"}
    assert value(text, "vae_inferences_total", **scored) == 1 and value(text, "vae_batch_size_rows_sum", **scored) == 3
    for method in ("decode", "forward"):
        assert value(text, "vae_inferences_total", model="vae", method=method) == 1
    fitted = {"model": "vae", "method": "anomaly_scores"}
    assert value(text, "vae_inferences_total", **fitted) == 1 and value(text, "vae_batch_size_rows_sum", **fitted) == 2
    assert value(text, "vae_requests_in_flight") == 0
    for name in ("vae", "deep-tiny"):
        assert value(text, "vae_model_load_seconds", model=name) > 0
    assert any(key[0] == "process_resident_memory_bytes" for key in samples(text))


def test_metrics_can_be_turned_off(models_dir: Path) -> None:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae", metrics=False))) as client:
        assert client.post("/encode", content=DIGIT, headers=PNG).status_code == 200
        assert client.get("/metrics").status_code == 404


@pytest.mark.slow
def test_metrics_add_up_over_worker_processes(models_dir: Path) -> None:
    with vae_serve({"VAE_MODELS_DIR": str(models_dir), "VAE_WORKERS": "2"}) as (base, _):
        pids = set()
        for _ in range(40):  # a new connection each time, so that both workers take some
            assert httpx.post(f"{base}/encode", content=DIGIT, headers=PNG, timeout=30).status_code == 200
            pids.add(httpx.get(f"{base}/models", timeout=30).json()["worker_pid"])
        text = httpx.get(f"{base}/metrics", timeout=30).text
    assert len(pids) == 2, "one worker took every request: nothing was summed"
    assert value(text, "vae_requests_total", endpoint="/encode", model="vae", status="200") == 40
    assert value(text, "vae_inferences_total", model="vae", method="encode") == 40


def test_grafana_dashboard_uses_only_exported_metrics(models_dir: Path) -> None:
    dashboard = json.loads((REPO / "deploy" / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 6
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as client:
        client.post("/encode", content=DIGIT, headers=PNG)
        exported = {f.name for f in text_string_to_metric_families(client.get("/metrics").text)}
    series = {f"{n}{suffix}" for n in exported for suffix in ("", "_total", "_bucket", "_sum", "_count")}
    for expr in exprs:
        names = set(re.findall(r"\b(vae_[a-z_]+)", expr))
        assert names and names <= series, (expr, names - series)
