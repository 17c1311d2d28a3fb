"""Overload and time limits: refuse at once rather than queue without bound or hang."""

from __future__ import annotations

import asyncio
import io
import json
import resource
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from PIL import Image, ImageDraw

from app.main import create_app
from app.middleware import HttpLimits, ServiceMiddleware
from app.settings import Settings
from tests.conftest import TEST_DATA, bomb_png, vae_serve

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()


def held_app(release: asyncio.Event):
    """An ASGI app that answers 200 only once `release` is set: requests held in progress."""

    async def app(scope, receive, send) -> None:
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def test_requests_beyond_in_flight_limit_get_503_at_once() -> None:
    release = asyncio.Event()
    app = ServiceMiddleware(held_app(release), HttpLimits(max_body_bytes=1000, max_in_flight=2))

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
    assert app.slots.in_flight == 0


def test_compute_timeout_answers_504(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", request_timeout_s=1e-9)
    with TestClient(create_app(settings)) as client:
        r = client.post("/anomaly-score?k=256", content=DIGIT, headers={"content-type": "image/png"})
        assert r.status_code == 504 and r.json() == {"error": "compute timeout",
                                                     "detail": "no result within 1e-09 s (VAE_REQUEST_TIMEOUT_S)"}
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

    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as client:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        big = client.post("/encode", content=b"\0" * (50 * 1024 * 1024), headers={"content-type": "image/png"})
        bomb = client.post("/encode", content=bomb_png(100_000, 100_000), headers={"content-type": "image/png"})
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert big.status_code == 413 and bomb.status_code == 413
    # The test client itself holds the 50 MB body (and a copy); the service adds nothing near 10 GB of pixels.
    assert (after - before) / 1024 < 200


def chunked(data: bytes, size: int = 65536) -> Iterator[bytes]:
    """No Content-Length: the body limit can only be enforced by counting as it streams in."""
    for i in range(0, len(data), size):
        yield data[i : i + size]


def multipart(files: list[bytes], boundary: str = "limitboundary") -> bytes:
    parts = [f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{i}.png\"\r\n"
             f"Content-Type: image/png\r\n\r\n".encode() + f + b"\r\n" for i, f in enumerate(files)]
    return b"".join(parts) + f"--{boundary}--\r\n".encode()


def test_every_over_limit_body_is_413_chunked_or_not(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", max_body_bytes=100_000)
    big = DIGIT + b"\0" * 150_000
    bodies = {
        "image/png": big,
        "multipart/form-data; boundary=limitboundary": multipart([DIGIT, big]),
        "application/json": b'{"images": ["' + b"A" * 150_000 + b'"]}',
    }
    with TestClient(create_app(settings)) as client:
        for ctype, body in bodies.items():
            for content in (body, chunked(body)):
                r = client.post("/encode", content=content, headers={"content-type": ctype})
                assert r.status_code == 413, (ctype, r.text)
                assert r.json()["error"] == "request body too large"
        small = multipart([DIGIT, DIGIT])  # under the limit, chunked: served
        r = client.post("/encode", content=chunked(small, 100), headers={"content-type": "multipart/form-data; "
                                                                         "boundary=limitboundary"})
        assert r.status_code == 200 and len(r.json()["results"]) == 2


def scan(size: int = 4000) -> bytes:
    """A page scan at the pixel limit: a pen stroke on white, ~30 KB as PNG, 16 MP decoded."""
    im = Image.new("L", (size, size), 255)
    ImageDraw.Draw(im).line([(size // 2, size // 8), (size // 2, size * 7 // 8)], fill=0, width=size // 100)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


@pytest.mark.slow
def test_probes_answer_while_the_heaviest_request_decodes(models_dir: Path) -> None:
    """64 page scans of 4000 x 4000 pixels in one multipart request, within every default limit, take
    seconds to decode: off the event loop, so /healthz and /readyz keep answering meanwhile. Decoding on
    the event loop would hold every probe for the whole decode (seconds); the bound of 0.5 s leaves
    room for a busy CI machine (alone, the probes take a few ms)."""
    heavy = multipart([scan()] * 64)
    assert len(heavy) < Settings().max_body_bytes
    with vae_serve({"VAE_MODELS_DIR": str(models_dir)}) as (base, _):

        async def main() -> tuple[httpx.Response, list[float]]:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client:
                request = asyncio.create_task(client.post(
                    "/encode", content=heavy, headers={"content-type": "multipart/form-data; boundary=limitboundary"}))
                await asyncio.sleep(0.5)  # the upload is in; decoding has started
                latencies = []
                while not request.done():
                    for path in ("/healthz", "/readyz"):
                        start = time.perf_counter()
                        assert (await client.get(path)).status_code == 200
                        latencies.append(time.perf_counter() - start)
                    await asyncio.sleep(0.02)
                return await request, latencies

        answer, latencies = asyncio.run(main())
    assert answer.status_code == 200 and len(answer.json()["results"]) == 64
    assert len(latencies) >= 10, "the heavy request finished too soon to measure anything"
    assert max(latencies) < 0.5, sorted(latencies)[-5:]


def test_decoding_past_the_request_timeout_is_a_504(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", request_timeout_s=0.2)
    with TestClient(create_app(settings)) as client:
        r = client.post("/encode", content=multipart([scan()] * 16),
                        headers={"content-type": "multipart/form-data; boundary=limitboundary"})
        assert r.status_code == 504 and r.json()["error"] == "compute timeout"
        assert client.post("/encode", content=DIGIT, headers={"content-type": "image/png"}).status_code == 200


def asgi_call(app, method: str, body_parts: list[bytes], gate: asyncio.Event | None = None,
              disconnect: bool = False) -> asyncio.Task:
    """A request straight into an ASGI app; its body arrives in parts, the last after `gate` opens."""
    sent: list[dict] = []
    parts = list(body_parts)
    headers = [(b"content-length", str(sum(map(len, body_parts))).encode()),
               (b"content-type", b"image/png")] if body_parts else []
    scope = {"type": "http", "method": method, "path": "/encode", "headers": headers, "query_string": b""}

    async def receive() -> dict:
        if len(parts) == 1 and gate is not None:
            await gate.wait()
            if disconnect:
                return {"type": "http.disconnect"}
        if parts:
            return {"type": "http.request", "body": parts.pop(0), "more_body": bool(parts)}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> list[dict]:
        await app(scope, receive, send)
        return sent

    return asyncio.create_task(run())


def reading_app(compute_s: float = 0.0):
    """An ASGI app that reads its whole body, computes for `compute_s`, and answers 200."""

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        if compute_s:
            await asyncio.sleep(compute_s)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    return app


def request(app, parts: list[dict], headers: list | None = None, path: str = "/encode",
            method: str = "POST") -> tuple[asyncio.Future, list[dict]]:
    """One request into an ASGI app, from inside a running loop: `parts` are its receive messages, after
    which nothing more comes (a stalled upload). The running request, and the messages it sends."""
    sent: list[dict] = []
    parts = list(parts)

    async def receive() -> dict:
        if parts:
            return parts.pop(0)
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers or [], "query_string": b""}
    return asyncio.ensure_future(app(scope, receive, send)), sent


BODILESS = [{"type": "http.request", "body": b""}]


def test_uploads_hold_receiving_slots_and_compute_slots_only_once_their_body_is_in() -> None:
    app = ServiceMiddleware(reading_app(), HttpLimits(max_in_flight=1, max_receiving=2))

    async def main() -> tuple[list, ...]:
        gate = asyncio.Event()
        slow = [asgi_call(app, "POST", [b"a", b"b"], gate) for _ in range(2)]
        await asyncio.sleep(0.01)
        assert (app.receiving, app.slots.in_flight) == (2, 0)  # trickling uploads hold no compute slot
        third = await asgi_call(app, "POST", [b"a", b"b"], gate)  # a third upload: over VAE_MAX_RECEIVING
        fast = await asgi_call(app, "GET", [])  # a request without a body computes at once
        gate.set()
        return [await t for t in slow], third, fast

    slow, third, fast = asyncio.run(main())
    assert [s[0]["status"] for s in slow] == [200, 200] and fast[0]["status"] == 200
    assert third[0]["status"] == 503
    assert json.loads(third[1]["body"])["detail"] == "2 uploads still arriving; the limit is 2 (VAE_MAX_RECEIVING)"
    assert (app.receiving, app.slots.in_flight) == (0, 0)


def test_a_client_that_leaves_mid_upload_is_no_error(models_dir: Path, caplog) -> None:
    """Starlette raises ClientDisconnect; nobody is left to answer, and it is no bug to log as one."""
    app = create_app(Settings(models_dir=models_dir, default_model="vae"))

    async def main() -> list[dict]:
        async with app.router.lifespan_context(app):
            gate = asyncio.Event()
            task = asgi_call(app, "POST", [DIGIT[:50], DIGIT[50:]], gate, disconnect=True)
            gate.set()
            return await task

    with caplog.at_level("INFO", logger="app"):
        sent = asyncio.run(main())
    assert sent == []  # no answer to a client that has gone
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert any('"status": 499' in r.getMessage() for r in caplog.records if r.name == "app.access")


def test_stalled_uploads_get_408_each_including_those_that_start_later() -> None:
    """The body deadline's one sweep: an upload that stalls is answered 408 with Connection: close once its
    deadline passes; the sweep re-arms while uploads remain, and starts again for an upload after it stopped."""

    timeout = 0.2
    app = ServiceMiddleware(reading_app(), HttpLimits(body_timeout_s=timeout))

    async def main() -> tuple[list, ...]:
        never = asyncio.Event()  # the rest of these bodies never comes
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        first = asgi_call(app, "POST", [b"12345", b"6"], never)
        await asyncio.sleep(0.6 * timeout)
        second = asgi_call(app, "POST", [b"123", b"4"], never)  # its deadline is after the first one's
        quick = asgi_call(app, "POST", [b"a", b"b"], gate := asyncio.Event())
        gate.set()
        ends = []
        for task in (first, second):
            ends.append(await asyncio.wait_for(task, 5) and loop.time() - t0)
        later = await asyncio.wait_for(asgi_call(app, "POST", [b"12", b"3"], never), 5)  # after the sweep stopped
        return first.result(), second.result(), await quick, later, ends

    first, second, quick, later, ends = asyncio.run(main())
    assert quick[0]["status"] == 200
    for sent, came in [(first, 5), (second, 3), (later, 2)]:
        assert sent[0]["status"] == 408 and (b"connection", b"close") in sent[0]["headers"]
        assert json.loads(sent[1]["body"]) == {
            "error": "request timeout",
            "detail": f"the body did not arrive within {timeout:g} s ({came} bytes came; VAE_BODY_TIMEOUT_S)"}
    assert timeout <= ends[0] < ends[1] and ends[1] >= 1.6 * timeout  # each at its own deadline, not before
    assert (app.receiving, app.slots.in_flight, app.deadlines, app.expired, app.sweeping) == (0, 0, {}, set(), False)


@pytest.mark.parametrize(("timeout", "interval"), [(0.2, 0.05), (2.0, 0.5), (4.0, 1.0), (30.0, 1.0)])
def test_a_stalled_upload_is_cut_off_within_a_quarter_of_its_timeout_and_at_most_a_second(timeout: float,
                                                                                          interval: float) -> None:
    assert ServiceMiddleware(None, HttpLimits(body_timeout_s=timeout))._sweep_interval() == interval  # type: ignore[arg-type]


def run_middleware(app, limits: HttpLimits | None = None, drain: bool = False, headers: list | None = None,
                   parts: list[dict] = BODILESS) -> tuple[list[dict], BaseException | None]:
    """One request through ServiceMiddleware around `app`: the messages sent, and what it raised."""
    from app.middleware import Drain

    mw = ServiceMiddleware(app, limits or HttpLimits(), drain=Drain(draining=drain))
    sent: list[list[dict]] = []

    async def main() -> None:
        task, messages = request(mw, parts, headers)
        sent.append(messages)
        await task

    try:
        asyncio.run(main())
    except BaseException as e:  # the test looks at what came out
        return sent[0], e
    return sent[0], None


@pytest.mark.parametrize("draining", [False, True])
def test_every_answer_carries_the_request_id_and_connection_close_while_draining(draining: bool) -> None:
    sent, raised = run_middleware(reading_app(), drain=draining, headers=[(b"x-request-id", b"abc")])
    assert raised is None
    extra = [(b"x-request-id", b"abc")] + ([(b"connection", b"close")] if draining else [])
    assert sent[0]["headers"] == extra  # lower-case names, as ASGI requires


def test_an_error_after_the_answer_started_is_raised_to_the_server_not_answered_twice(caplog) -> None:
    async def half_then_fail(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise ValueError("broke mid-answer")

    caplog.set_level("INFO", logger="app.access")
    sent, raised = run_middleware(half_then_fail)
    assert isinstance(raised, ValueError) and [m["type"] for m in sent] == ["http.response.start"]
    assert [json.loads(r.getMessage())["status"] for r in caplog.records if r.name == "app.access"] == [200]


def test_a_request_cancelled_before_its_answer_is_logged_as_500(caplog) -> None:
    async def cancelled(scope, receive, send) -> None:
        raise asyncio.CancelledError  # the server gave up on it (shutdown past its grace period)

    caplog.set_level("INFO", logger="app.access")
    sent, raised = run_middleware(cancelled)
    assert isinstance(raised, asyncio.CancelledError) and sent == []
    assert [json.loads(r.getMessage())["status"] for r in caplog.records if r.name == "app.access"] == [500]


def test_a_response_start_without_headers_still_gets_the_request_id() -> None:
    async def bare(scope, receive, send) -> None:  # ASGI allows leaving "headers" out
        await send({"type": "http.response.start", "status": 204})
        await send({"type": "http.response.body", "body": b""})

    sent, raised = run_middleware(bare, headers=[(b"x-request-id", b"r9")])
    assert raised is None and sent[0]["headers"] == [(b"x-request-id", b"r9")]


def test_a_body_of_exactly_the_limit_is_served_and_one_byte_more_is_not(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", max_body_bytes=100_000)
    exact = DIGIT + b"\0" * (100_000 - len(DIGIT))  # trailing bytes after IEND: the PNG still decodes
    png = {"content-type": "image/png"}
    with TestClient(create_app(settings)) as client:
        for content in (exact, chunked(exact, 1000)):  # counted by Content-Length, and chunk by chunk
            assert client.post("/encode", content=content, headers=png).status_code == 200
        r = client.post("/encode", content=chunked(exact + b"\0", 1000), headers=png)
        assert r.status_code == 413 and r.json()["detail"] == ("more than 100000 bytes; the limit is 100000 "
                                                               "(VAE_MAX_BODY_BYTES)")


def test_the_body_deadline_holds_for_chunked_uploads_and_never_for_a_slow_answer() -> None:
    app = ServiceMiddleware(reading_app(compute_s=0.3), HttpLimits(body_timeout_s=0.1))  # computes past it

    async def main() -> tuple[list, list, list]:
        stalled, stalled_sent = request(app, [{"type": "http.request", "body": b"12", "more_body": True}],
                                        [(b"transfer-encoding", b"chunked")])
        slow, slow_sent = request(app, [{"type": "http.request", "body": b"ab"}], [(b"content-length", b"2")])
        bodiless, bodiless_sent = request(app, BODILESS)  # never an upload
        await asyncio.wait_for(asyncio.gather(stalled, slow, bodiless), 5)
        return stalled_sent, slow_sent, bodiless_sent

    stalled_sent, slow_sent, bodiless_sent = asyncio.run(main())
    assert stalled_sent[0]["status"] == 408
    assert slow_sent[0]["status"] == bodiless_sent[0]["status"] == 200
    assert (app.deadlines, app.expired, app.receiving, app.slots.in_flight) == ({}, set(), 0, 0)


def test_an_upload_computes_in_an_in_flight_slot_and_leaves_nothing_behind_when_the_app_fails() -> None:
    release = asyncio.Event()

    async def app(scope, receive, send) -> None:
        while (await receive()).get("more_body"):
            pass
        if scope["path"] == "/broken":
            raise RuntimeError("fails after reading nothing more")
        await release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    async def early_failure(scope, receive, send) -> None:
        raise RuntimeError("fails before reading its body")

    mw = ServiceMiddleware(app, HttpLimits(max_in_flight=1))
    failing = ServiceMiddleware(early_failure, HttpLimits())

    def call(target: ServiceMiddleware, path: str, body: bytes) -> tuple[asyncio.Future, list[dict]]:
        headers = [(b"content-length", str(len(body)).encode())] if body else []
        return request(target, [{"type": "http.request", "body": body}], headers, path)

    async def main() -> tuple[list, list, list]:
        upload, upload_sent = call(mw, "/encode", b"png")
        await asyncio.sleep(0.05)  # its body is in: it now computes, in the one slot
        _, second_sent = call(mw, "/sample", b"")
        await asyncio.sleep(0.05)
        release.set()
        await asyncio.wait_for(upload, 5)
        task, failed_sent = call(failing, "/encode", b"png")
        await asyncio.wait_for(task, 5)
        return upload_sent, second_sent, failed_sent

    upload_sent, second_sent, failed_sent = asyncio.run(main())
    assert (upload_sent[0]["status"], second_sent[0]["status"], failed_sent[0]["status"]) == (200, 503, 500)
    assert (mw.slots.in_flight, mw.receiving) == (0, 0)
    assert (failing.deadlines, failing.receiving) == ({}, 0)  # the upload's deadline went with it


def test_a_limit_error_that_escapes_the_app_is_answered_by_the_middleware() -> None:
    """An ASGI app that does not catch the body limit's error (no FastAPI handler around it) still gets a 413."""
    parts = [{"type": "http.request", "body": b"abc", "more_body": True},
             {"type": "http.request", "body": b"def", "more_body": False}]
    sent, raised = run_middleware(reading_app(), HttpLimits(max_body_bytes=5),
                                  headers=[(b"transfer-encoding", b"chunked")], parts=parts)
    assert raised is None and sent[0]["status"] == 413
    assert json.loads(sent[1]["body"]) == {"error": "request body too large",
                                           "detail": "more than 5 bytes; the limit is 5 (VAE_MAX_BODY_BYTES)"}
