"""The image reader: where and how long decoding runs, and how the request's images are found."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

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
