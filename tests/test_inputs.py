"""The image reader: where and how long decoding runs, and how the request's images are found."""

from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import app.inputs
from app.exceptions import ComputeTimeout
from app.imaging import Preprocess
from app.inputs import ImageReader
from app.main import create_app
from app.settings import Settings


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae", max_batch=8))) as c:
        yield c


def photo_bytes() -> bytes:
    """Not a 28x28 grey PNG, so it goes to the reader's thread pool."""
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), "white").save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(("cpus", "threads", "expected"), [(None, None, 1), (1, None, 1), (2, None, 2),
                                                           (16, None, 4), (16, 3, 3), (2, 6, 6)])
def test_the_decoding_pool_has_one_thread_per_core_up_to_four_unless_told(monkeypatch, cpus, threads,
                                                                          expected) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    reader = ImageReader(max_pixels=10**6, timeout_s=5.0, threads=threads)
    reader.close()
    assert reader.pool._max_workers == expected


class SlowDecoder:
    """Stands in for app.inputs.gray28: records the thread it runs on and waits until released."""

    def __init__(self) -> None:
        self.release, self.done = threading.Event(), threading.Event()
        self.threads: list[str] = []

    def __call__(self, data, header, max_pixels, prep) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        self.release.wait(5)
        self.done.set()
        return np.zeros((28, 28), np.uint8)


def test_large_images_decode_on_the_images_pool_and_answer_504_at_the_deadline(monkeypatch) -> None:
    slow = SlowDecoder()
    monkeypatch.setattr(app.inputs, "gray28", slow)
    reader = ImageReader(max_pixels=10**6, timeout_s=0.05)

    async def main() -> None:
        with pytest.raises(ComputeTimeout) as late:
            await reader([photo_bytes()], Preprocess())  # one file, still decoding at the deadline
        assert late.value.detail == "images not decoded within 0.05 s (VAE_REQUEST_TIMEOUT_S)"
        assert not slow.done.is_set()  # answered at the deadline, not when the decoder finished

    try:
        asyncio.run(main())
    finally:
        slow.release.set()
        reader.close()
    assert slow.threads and slow.threads[0].startswith("images")


def test_close_neither_waits_for_a_running_decode_nor_starts_the_queued_ones(monkeypatch) -> None:
    slow = SlowDecoder()
    monkeypatch.setattr(app.inputs, "gray28", slow)
    reader = ImageReader(max_pixels=10**6, timeout_s=5.0, threads=1)

    async def main() -> None:
        tasks = [asyncio.create_task(reader([photo_bytes()], Preprocess())) for _ in range(3)]
        while not slow.threads:
            await asyncio.sleep(0.001)
        reader.close()  # shutting down: must not block the event loop on the decode in progress
        assert not slow.done.is_set()
        slow.release.set()
        await asyncio.wait(tasks, timeout=5)
        assert [t.cancelled() for t in tasks] == [False, True, True]

    asyncio.run(main())
    reader.pool.shutdown(wait=True)
    assert len(slow.threads) == 1  # the two queued decodes never ran


def test_a_body_without_content_type_is_told_what_to_send(client: TestClient) -> None:
    r = client.post("/encode", content=b"\x89PNG")
    assert r.status_code == 415
    assert r.json()["detail"].startswith("got no Content-Type; send image/*")


def test_a_form_may_carry_sixteen_fields_beside_its_files(client: TestClient) -> None:
    digit = io.BytesIO()
    Image.new("L", (28, 28)).save(digit, "PNG")
    files = [("file", ("a.png", digit.getvalue(), "image/png"))]
    max_fields = 8 + 16  # VAE_MAX_BATCH + 16
    ok = client.post("/encode", files=files, data={f"f{i}": "x" for i in range(max_fields)})
    assert ok.status_code == 200, ok.text
    over = client.post("/encode", files=files, data={f"f{i}": "x" for i in range(max_fields + 1)})
    assert over.status_code == 400 and over.json()["error"] == "malformed multipart body"
    assert "Too many fields" in over.json()["detail"]
