"""SIGTERM without lost requests: report not ready first, keep answering a while, then stop.

uvicorn, on SIGTERM, stops accepting at once and closes idle keep-alive connections under their
clients' feet: a request sent on one at that instant is lost, and a load balancer that has not
yet seen the pod leave keeps sending new ones to a closed port. So the first SIGTERM only sets
the app draining (/readyz and /v2/health/ready answer 503, every answer carries
`Connection: close` so that clients reconnect elsewhere) and hands the signal on to uvicorn
`VAE_DRAIN_DELAY_S` later; uvicorn then stops accepting and lets in-flight requests finish
within `VAE_SHUTDOWN_GRACE_S`. A second SIGTERM or SIGINT goes to uvicorn at once.

Kubernetes: a `preStop` sleep removes the pod from the Service's endpoints before SIGTERM;
`terminationGracePeriodSeconds` must exceed preStop + VAE_DRAIN_DELAY_S + VAE_SHUTDOWN_GRACE_S.
Compose: `stop_grace_period` must exceed VAE_DRAIN_DELAY_S + VAE_SHUTDOWN_GRACE_S.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from app.middleware import Drain

log = logging.getLogger("app")


@contextmanager
def drain_on_sigterm(drain: Drain, delay_s: float) -> Iterator[None]:
    """Wrap the SIGTERM handler the server installed (uvicorn's) for as long as the app runs.

    Only possible in the main thread, where uvicorn runs the app; elsewhere (TestClient) the
    handler is left alone.
    """
    if delay_s <= 0 or threading.current_thread() is not threading.main_thread():
        yield
        return
    server_handler = signal.getsignal(signal.SIGTERM)
    if not callable(server_handler):
        yield
        return
    timer: threading.Timer | None = None

    def on_sigterm(sig: int, frame: FrameType | None) -> None:
        nonlocal timer
        if drain.draining:  # a second SIGTERM: no more waiting
            server_handler(sig, frame)
            return
        drain.draining = True
        log.info("SIGTERM: draining for %g s (not ready, Connection: close), then shutting down", delay_s)
        timer = threading.Timer(delay_s, server_handler, (sig, frame))
        timer.daemon = True
        timer.start()

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
        if signal.getsignal(signal.SIGTERM) is on_sigterm:
            signal.signal(signal.SIGTERM, server_handler)

