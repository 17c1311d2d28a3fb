"""Prometheus metrics, exposed by prometheus-client at GET /metrics (README: what each one means).

Every name has the `vae_` prefix and base units. With several worker processes each one
writes its values to files in PROMETHEUS_MULTIPROC_DIR (vae-serve sets it up) and a scrape,
answered by any worker, adds them up: prometheus-client's multiprocess mode.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
    multiprocess,
)

disable_created_metrics()  # the *_created series only double what a scrape shows; Prometheus does not need them

# 0.1 ms (a bare request on loopback) to 10 s (a big batch of large anomaly scores).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                   10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PassObserver = Callable[[int, Sequence[float]], None]  # rows in the pass, seconds each request waited for it


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    def __init__(self) -> None:
        # A registry of our own: several apps in one process (tests) must not collide in the global one.
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("vae_requests", "HTTP requests answered, by route, model and status",
                                ["endpoint", "model", "status"], registry=r)
        self.latency = Histogram("vae_request_duration_seconds", "time from the request's arrival to its answer",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("vae_requests_in_flight", "model requests in progress (those VAE_MAX_IN_FLIGHT bounds)",
                               registry=r, multiprocess_mode="livesum")
        self.passes = Counter("vae_forward_passes", "forward passes run, by model and method", ["model", "method"],
                              registry=r)
        self.inferences = Counter("vae_inferences", "requests served by forward passes (inferences / passes = "
                                  "average batch of requests)", ["model", "method"], registry=r)
        self.batch_rows = Histogram("vae_batch_size_rows", "rows (images, latents) in one forward pass",
                                    ["model", "method"], buckets=BATCH_BUCKETS, registry=r)
        self.queued = Histogram("vae_queue_seconds", "time a request waited for its forward pass to start",
                                ["model", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.load_seconds = Gauge("vae_model_load_seconds", "time to load, check and warm up each model at start-up",
                                  ["model"], registry=r, multiprocess_mode="max")
        if multiprocess_dir() is None:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)

    def observe_request(self, endpoint: str, model: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, model, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def pass_observer(self, model: str, method: str) -> PassObserver:
        """What a batcher calls after each pass; the label lookups are done once, here."""
        passes, inferences = self.passes.labels(model, method), self.inferences.labels(model, method)
        rows_hist, queued = self.batch_rows.labels(model, method), self.queued.labels(model, method)

        def observe(rows: int, waits: Sequence[float]) -> None:
            passes.inc()
            inferences.inc(len(waits))
            rows_hist.observe(rows)
            for waited in waits:
                queued.observe(waited)

        return observe

    def exposition(self) -> tuple[bytes, str]:
        if multiprocess_dir() is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
