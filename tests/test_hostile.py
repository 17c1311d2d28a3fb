"""Single requests that used to freeze, starve or outgrow a worker: each gets a quick, exact answer and
costs nobody else anything (issue: "No single request may freeze, starve or outgrow the service")."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from app.artifacts import load_model
from app.batching import ComputeThread
from app.imaging import file_to_gray28, is_fast_png, png_header
from app.inference import Batching, Engine, Limits
from app.main import create_app
from app.preprocess import Preprocess, drawn_png
from app.settings import Settings
from tests import hostile
from tests.conftest import TEST_DATA, vae_serve

DIGIT = hostile.DIGIT
PHOTO = (TEST_DATA / "photo_dark_on_light_digit_4.jpg").read_bytes()
PNG = {"content-type": "image/png"}
JSON = {"content-type": "application/json"}


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as c:
        yield c


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt", b"iCCP"])
def test_compressed_chunks_never_reach_a_decoder_and_the_digit_is_read(client: TestClient, kind: bytes) -> None:
    bomb = hostile.text_bomb_png(50, kind)
    assert not is_fast_png(bomb, png_header(bomb))  # not on the event loop...
    assert drawn_png(bomb) == DIGIT  # ...and the chunks are dropped before Pillow sees the file
    plain = client.post("/encode", content=DIGIT, headers=PNG).json()
    assert client.post("/encode", content=bomb, headers=PNG).json() == plain


def test_only_small_plain_pngs_take_the_event_loop_path() -> None:
    assert is_fast_png(DIGIT, png_header(DIGIT))
    many = hostile.many_chunks_png(600)  # harmless chunks, but 9 KB of them
    assert not is_fast_png(many, png_header(many))
    assert (file_to_gray28(many, 10**6, Preprocess()) == file_to_gray28(DIGIT, 10**6, Preprocess())).all()


@pytest.mark.parametrize(("path", "body", "error"), [
    ("/decode?model=vae", hostile.many_latents_json(1_700_000, 2), "more than 64 vectors of 2 values"),
    ("/encode", hostile.many_pixels_json(6000), "more than 64 images of 28x28 pixels"),
    ("/decode?model=vae", b'{"z": [[' + b",".join([b"0"] * 4_900_000) + b"]]}", "more than 64 vectors"),
])
def test_oversized_json_is_refused_before_it_is_parsed(client: TestClient, path: str, body: bytes,
                                                       error: str) -> None:
    r = client.post(path, content=body, headers=JSON)
    assert r.status_code == 413 and r.json()["error"] == "batch too large"
    assert error in r.json()["detail"] and "VAE_MAX_BATCH" in r.json()["detail"]


def test_a_million_numbers_to_the_protocol_are_refused_before_parsing(client: TestClient) -> None:
    r = client.post("/v2/models/vae.encode/infer", content=hostile.many_numbers_infer_json(), headers=JSON)
    assert r.status_code == 400 and "more than" in r.json()["error"] and "VAE_MAX_BATCH" in r.json()["error"]


@pytest.mark.parametrize("path", ["/encode", "/decode", "/reconstruct", "/anomaly-score",
                                  "/v2/models/vae.encode/infer"])
def test_json_nested_100000_deep_is_a_400_not_a_500(client: TestClient, path: str, caplog) -> None:
    r = client.post(path, content=hostile.deep_json(), headers=JSON)
    assert r.status_code == 400, r.text
    assert "recursion limit exceeded" in r.text
    assert "Traceback" not in caplog.text


@pytest.mark.parametrize("value", [b"\xb2", "١٢".encode(), "12".encode("utf-16-le"), b"12a", b"-5", b""])
def test_a_header_length_that_is_no_ascii_number_is_a_400(client: TestClient, value: bytes) -> None:
    """0xB2 is "²" in latin-1, which str.isdigit() takes and int() does not."""
    body = b'{"inputs": []}'
    r = client.post("/v2/models/vae.encode/infer", content=body,
                    headers={**JSON, "inference-header-content-length": value})
    assert r.status_code == 400 and "Inference-Header-Content-Length" in r.json()["error"]


def test_an_image_hidden_inside_an_icon_is_held_to_the_pixel_limit(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", max_image_pixels=1_000_000)
    with TestClient(create_app(settings)) as c:
        r = c.post("/encode", content=hostile.ico_hiding(hostile.huge_png(3000, 3000)),
                   headers={"content-type": "image/x-icon"})
        assert r.status_code == 413 and r.json()["error"] == "image too large"
        assert r.json()["detail"] == "9000000 pixels; the limit is 1000000 pixels (VAE_MAX_IMAGE_PIXELS)"
        small = c.post("/encode", content=hostile.ico_hiding(DIGIT, 28), headers={"content-type": "image/x-icon"})
        assert small.status_code == 200  # an honest icon still works


def test_the_largest_sample_answers_as_json(client: TestClient) -> None:
    r = client.get("/sample?n=256&format=json&seed=3")
    assert r.status_code == 200 and len(r.json()["images"]) == 256


def test_a_one_image_score_is_served_between_the_passes_of_the_largest_legal_request(models_dir: Path) -> None:
    """64 images at k=1000 run as 64 passes of one image each (VAE_BATCH_MAX_SAMPLES=1024); a one-image score
    sent just after it is answered after at most one of them, not after all 64."""
    model = load_model(models_dir / "vae.pt", torch.device("cpu"))
    compute = ComputeThread()
    engine = Engine(model, compute, Batching(), Limits())
    assert engine.score_rows(1000) == 1 and engine.score_rows(64) == 16 and engine.score_rows(1) == 64
    big, small = torch.rand(64, 1, 28, 28), torch.rand(1, 1, 28, 28)
    order: list[str] = []

    async def score(name: str, x: torch.Tensor, k: int) -> None:
        await engine.anomaly_scores(x, k, 0, None)
        order.append(name)

    async def main() -> None:
        first = asyncio.create_task(score("big", big, 1000))
        await asyncio.sleep(0)  # the big one's first pass is queued
        await asyncio.gather(first, score("small", small, 64))

    try:
        asyncio.run(main())
    finally:
        engine.close()
        compute.shutdown()
    assert order == ["small", "big"]
    assert engine.stats()["anomaly_scores_k1000"]["passes"] == 64


@pytest.mark.slow
def test_bombs_cost_their_senders_a_504_and_nobody_else_anything(models_dir: Path) -> None:
    """Two scan bombs (60,000 scans: about a minute of libjpeg each here), an 8.8 MB PNG of compressed text chunks,
    1.7 M latents and JSON nested 100,000 deep, all at once; then, while the bombs still decode, an
    ordinary photo. The bombs get 504 at the deadline (their processes stopped), the others their 4xx
    or 200, and the photo is answered before the bombs are: it never waited behind them. Order, not
    time, is what is checked; `python -m bench.hostile` has the figures."""
    bomb = hostile.scan_bomb_jpeg(4000, 60_000)  # 2.1 MB; far past the deadline on any machine
    env = {"VAE_MODELS_DIR": str(models_dir), "VAE_REQUEST_TIMEOUT_S": "8", "VAE_DECODERS": "4"}
    jpeg = {"content-type": "image/jpeg"}
    finished: list[str] = []
    with vae_serve(env) as (base, _):

        async def send(client: httpx.AsyncClient, name: str, path: str, **kwargs: Any) -> httpx.Response:
            answer = await client.post(path, **kwargs)
            finished.append(name)
            return answer

        async def main() -> tuple[list[int], int, int]:
            async with httpx.AsyncClient(base_url=base, timeout=120) as client, \
                    httpx.AsyncClient(base_url=base, timeout=120) as probe:
                hostile_ones = [asyncio.create_task(send(client, name, path, content=body, headers=headers))
                                for name, path, body, headers in (
                                    ("bomb", "/encode", bomb, jpeg), ("bomb", "/encode", bomb, jpeg),
                                    ("text", "/encode", hostile.text_bomb_png(1000), PNG),
                                    ("latents", "/decode?model=vae", hostile.many_latents_json(), JSON),
                                    ("deep", "/encode", hostile.deep_json(), JSON))]
                await asyncio.sleep(1.0)  # the bombs are decoding
                photo = await send(client, "photo", "/encode", content=PHOTO, headers=jpeg)
                probes = 0
                while not all(t.done() for t in hostile_ones):  # the event loop answers all along
                    assert (await probe.get("/healthz")).status_code == 200
                    probes += 1
                    await asyncio.sleep(0.05)
                return [t.result().status_code for t in hostile_ones], photo.status_code, probes

        statuses, photo, probes = asyncio.run(main())
    assert statuses == [504, 504, 200, 413, 400]
    assert photo == 200 and finished.index("photo") < finished.index("bomb")
    assert probes > 0


@pytest.mark.slow
def test_a_dead_workers_metrics_are_cleared_and_a_worker_that_cannot_restart_leaves_the_others(
        models_dir: Path, tmp_path: Path) -> None:
    import os
    import shutil
    import signal

    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(models_dir / "vae.pt", folder / "vae.pt")
    with vae_serve({"VAE_MODELS_DIR": str(folder), "VAE_WORKERS": "2", "VAE_DEFAULT_MODEL": "vae"}) as (base, proc):
        pids = {httpx.get(f"{base}/models").json()["worker_pid"] for _ in range(40)}
        (folder / "vae.pt").write_bytes(b"not a model")  # a bad deploy under a running service
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            ready = httpx.get(f"{base}/readyz").json()
            if ready["workers"]["failing"]:
                break
            time.sleep(0.5)
        assert ready["workers"]["configured"] == 2 and ready["workers"]["failing"][0]["exit_code"] == 3
        assert ready["workers"]["ready"] == 1  # the healthy one; the failing one is retried, never ready
        for _ in range(10):  # the healthy worker keeps serving
            assert httpx.post(f"{base}/encode", content=DIGIT, headers=PNG).status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert "vae_requests_in_flight 0.0" in metrics  # the killed worker's gauge no longer counts
        assert proc.poll() is None
