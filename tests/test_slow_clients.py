"""Hostile and slow clients against a real `vae-serve` with small limits and short deadlines:
slow uploads never take the compute slots, slow or huge request heads are cut off, a connection
flood is refused at once, and SIGTERM loses no request that arrived before the drain delay ended."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import TEST_DATA, vae_serve

pytestmark = pytest.mark.slow
DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
LIMITS = {"VAE_MAX_IN_FLIGHT": "4", "VAE_MAX_RECEIVING": "64", "VAE_MAX_CONNECTIONS": "48",
          "VAE_HEADER_TIMEOUT_S": "1", "VAE_BODY_TIMEOUT_S": "2", "VAE_MAX_HEADER_BYTES": "4096",
          "VAE_KEEP_ALIVE_S": "3"}


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[str]:
    with vae_serve({"VAE_MODELS_DIR": str(models_dir), **LIMITS}) as (base, _):
        yield base


def connect(base: str) -> socket.socket:
    host, port = base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def answer(s: socket.socket, within: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and when it closed."""
    s.settimeout(within)
    data, start = b"", time.monotonic()
    try:
        while chunk := s.recv(65536):
            data += chunk
    except TimeoutError:
        pytest.fail(f"connection still open after {within} s; got {data[:200]!r}")
    return data, time.monotonic() - start


def answered(s: socket.socket) -> bool:
    """Whether the server has sent anything on this connection yet (without waiting for it)."""
    s.setblocking(False)
    try:
        return bool(s.recv(1, socket.MSG_PEEK))
    except BlockingIOError:
        return False
    finally:
        s.setblocking(True)


def encode(base: str) -> int:
    return httpx.post(f"{base}/encode", content=DIGIT, headers={"content-type": "image/png"}, timeout=10).status_code


def test_slow_uploads_beyond_the_in_flight_limit_do_not_stop_fast_requests(server: str) -> None:
    slow = []
    for _ in range(12):  # three times VAE_MAX_IN_FLIGHT
        s = connect(server)
        s.sendall(b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
                  b"Content-Length: 100000\r\n\r\nx")
        slow.append(s)
    time.sleep(0.3)
    with ThreadPoolExecutor(3) as pool:  # fewer than VAE_MAX_IN_FLIGHT: none is refused for load
        statuses = list(pool.map(lambda _: encode(server), range(12)))
    assert statuses == [200] * 12  # every one served while the uploads trickle,
    assert not any(answered(s) for s in slow)  # not by waiting for the uploads to be cut off
    for s in slow:  # each upload is cut off by VAE_BODY_TIMEOUT_S (2 s) with a 408
        data, _ = answer(s, within=5)
        assert data.startswith(b"HTTP/1.1 408 ") and b'"error":"request timeout"' in data
        assert b"VAE_BODY_TIMEOUT_S" in data and b"connection: close" in data.lower()
        s.close()


def test_a_head_that_never_finishes_is_cut_off(server: str) -> None:
    s = connect(server)
    s.sendall(b"POST /encode HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and never the rest
    data, took = answer(s, within=5)
    assert data.startswith(b"HTTP/1.1 408 Request Timeout") and b"VAE_HEADER_TIMEOUT_S" in data
    assert 0.8 < took < 3


def test_an_oversized_head_is_refused(server: str) -> None:
    s = connect(server)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n")
    data, _ = answer(s, within=5)
    assert data.startswith(b"HTTP/1.1 431 ") and b"VAE_MAX_HEADER_BYTES" in data
    s = connect(server)  # the same head, trickled in pieces, is refused as soon as it is too large
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: ")
    for _ in range(5):
        s.sendall(b"a" * 1000)
        time.sleep(0.05)
    data, _ = answer(s, within=5)
    assert data.startswith(b"HTTP/1.1 431 ")
    ok = httpx.get(f"{server}/healthz", headers={"X-Fine": "a" * 2000})
    assert ok.status_code == 200  # a head under the limit is fine


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server: str) -> None:
    s = connect(server)
    data, took = answer(s, within=8)
    assert data == b"" and 2.5 < took < 6  # VAE_KEEP_ALIVE_S = 3


def test_a_connection_flood_above_the_cap_gets_503_at_once(server: str) -> None:
    flood = [connect(server) for _ in range(60)]  # VAE_MAX_CONNECTIONS = 48
    time.sleep(0.3)
    try:
        start = time.monotonic()
        refused = httpx.get(f"{server}/healthz", timeout=5)
        assert refused.status_code == 503 and time.monotonic() - start < 1
    finally:
        for s in flood:
            s.close()
    time.sleep(0.3)
    assert httpx.get(f"{server}/readyz").status_code == 200 and encode(server) == 200


def test_sigterm_loses_no_request_sent_before_the_drain_delay_ended(models_dir: Path) -> None:
    delay = 2.0
    with vae_serve({"VAE_MODELS_DIR": str(models_dir), "VAE_DRAIN_DELAY_S": str(delay)}) as (base, proc):
        log: list[tuple[float, object]] = []
        stop = threading.Event()
        drained: list[tuple[int, str]] = []

        def client() -> None:
            with httpx.Client(timeout=10) as c:  # keep-alive: the connections SIGTERM must not drop
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        r = c.post(f"{base}/encode", content=DIGIT, headers={"content-type": "image/png"})
                        outcome: object = r.status_code
                        if r.headers.get("connection") == "close":
                            drained.append((r.status_code, r.headers["connection"]))
                    except httpx.HTTPError as e:
                        outcome = type(e).__name__
                    log.append((sent, outcome))

        threads = [threading.Thread(target=client) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(1.0)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        ready = httpx.get(f"{base}/readyz", timeout=5)
        time.sleep(delay + 1.5)
        stop.set()
        for t in threads:
            t.join()
        proc.wait(30)
    assert ready.status_code == 503 and "shutting down" in ready.json()["detail"]
    before = [outcome for sent, outcome in log if sent < signalled + delay - 0.2]
    assert len(before) > 50 and all(o == 200 for o in before), [o for o in before if o != 200]
    assert drained, "no answer during the drain said Connection: close"
