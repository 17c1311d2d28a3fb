"""The real app, with real tiny artifacts, through TestClient (httpx)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from torchvision.io import decode_png
from torchvision.utils import make_grid

from app.artifacts import ModelLoadError
from app.imaging import Preprocess, file_to_tensor, files_to_tensor, grid, to_png
from app.main import create_app
from app.settings import Settings
from tests.conftest import TEST_DATA, bomb_png
from training import export
from training.data import to_float

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
DIGITS = sorted(TEST_DATA.glob("mnist_test_*.png"))
PHOTO = (TEST_DATA / "photo_dark_on_light_digit_4.jpg").read_bytes()


def settings(models_dir: Path, **overrides) -> Settings:
    return Settings(**{"models_dir": models_dir, "default_model": "vae", **overrides})


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    app = create_app(settings(models_dir, max_body_bytes=2_000_000, max_batch=8, max_samples=64, max_k=256))
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def artifact(models_dir: Path) -> torch.jit.ScriptModule:
    return export.load(models_dir / "vae.pt")[0]


def png_of(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def prep(data: bytes) -> torch.Tensor:
    return file_to_tensor(data, 10**8, Preprocess())


# --- readiness and metadata ------------------------------------------------------------

def test_readyz_is_503_before_startup_and_200_after(models_dir: Path) -> None:
    app = create_app(settings(models_dir))
    cold = TestClient(app)  # no lifespan yet: models not loaded
    r = cold.get("/readyz")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert cold.get("/healthz").status_code == 200
    assert cold.post("/encode", content=DIGIT, headers={"content-type": "image/png"}).status_code == 503
    with TestClient(app) as warm:
        assert warm.get("/readyz").json() == {"status": "ready", "models": ["deep-tiny", "vae"]}


def test_models_lists_meta_and_device(client: TestClient) -> None:
    body = client.get("/models").json()
    assert body["default"] == "vae"
    by_name = {m["name"]: m for m in body["models"]}
    assert by_name["vae"]["latent_dim"] == 2 and by_name["deep-tiny"]["latent_dim"] == 8
    # VAE_DEVICE=auto: the GPU where there is one (scripts/gpu-check.sh runs this suite there too)
    assert by_name["vae"]["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    assert "anomaly_calibration" in by_name["vae"]


def batching_counts(client: TestClient, model: str) -> dict:
    """/models' batching counts of one model, by method."""
    return {m["name"]: m["batching"] for m in client.get("/models").json()["models"]}[model]


def test_models_counts_requests_and_passes(client: TestClient) -> None:
    before = batching_counts(client, "deep-tiny")
    for _ in range(3):
        client.post("/encode?model=deep-tiny", content=DIGIT, headers={"content-type": "image/png"})
    after = batching_counts(client, "deep-tiny")["encode"]
    assert after["requests"] - before.get("encode", {"requests": 0})["requests"] == 3
    assert 1 <= after["passes"] <= after["requests"] and after["inline_passes"] <= after["passes"]


def test_models_names_each_methods_counts(client: TestClient) -> None:
    before = batching_counts(client, "deep-tiny")
    client.post("/decode?model=deep-tiny", json={"z": [[0.0] * 8]})
    client.post("/reconstruct?model=deep-tiny&format=json", content=DIGIT, headers={"content-type": "image/png"})
    client.post("/anomaly-score?model=deep-tiny&method=bound&k=8", content=DIGIT,
                headers={"content-type": "image/png"})
    after = batching_counts(client, "deep-tiny")
    for method in ("decode", "forward", "log_likelihood_k8"):
        assert after[method]["requests"] - before.get(method, {"requests": 0})["requests"] == 1, (method, after)


def test_the_inline_budget_setting_reaches_every_batcher(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir, inline_max_us=1234))) as c:
        batchers = c.app.state.repository.engines["vae"].batchers()
    assert {b.inline_max_s for b in batchers.values()} == {0.001234}


# --- encode ----------------------------------------------------------------------------

def test_encode_raw_png_matches_artifact(client: TestClient, artifact) -> None:
    r = client.post("/encode", content=DIGIT, headers={"content-type": "image/png"})
    assert r.status_code == 200
    body = r.json()
    mu, logvar = artifact.encode(prep(DIGIT)[None])
    assert body["model"] == "vae" and body["latent_dim"] == 2
    torch.testing.assert_close(torch.tensor(body["mu"]), mu[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(body["logvar"]), logvar[0], rtol=0, atol=1e-6)


def test_encode_multipart_batch_keeps_order(client: TestClient, artifact) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in DIGITS]
    body = client.post("/encode", files=files).json()
    x = torch.stack([prep(p.read_bytes()) for p in DIGITS])
    mu, _ = artifact.encode(x)
    assert len(body["results"]) == len(DIGITS)
    for row, expected in zip(body["results"], mu, strict=True):
        torch.testing.assert_close(torch.tensor(row["mu"]), expected, rtol=0, atol=1e-5)


def test_encode_json_base64_and_pixels_agree(client: TestClient) -> None:
    b64 = client.post("/encode", json={"images": [base64.b64encode(DIGIT).decode()]}).json()
    pixels = prep(DIGIT)[0].tolist()
    px = client.post("/encode", json={"pixels": [pixels]}).json()
    raw = client.post("/encode", content=DIGIT, headers={"content-type": "image/png"}).json()
    assert b64["mu"] == raw["mu"]
    torch.testing.assert_close(torch.tensor(px["mu"]), torch.tensor(raw["mu"]), rtol=0, atol=1e-5)


def test_other_model_by_name(client: TestClient) -> None:
    body = client.post("/encode?model=deep-tiny", content=DIGIT, headers={"content-type": "image/png"}).json()
    assert body["model"] == "deep-tiny" and len(body["mu"]) == 8


# --- decode, sample, reconstruct -------------------------------------------------------

def test_decode_png_and_json(client: TestClient, artifact) -> None:
    z = [[0.5, -1.0], [0.0, 0.0], [2.0, 1.0], [-1.0, 0.3]]
    r = client.post("/decode", json={"z": z})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (2 * 30 + 2, 2 * 30 + 2)
    body = client.post("/decode", json={"z": z}, headers={"accept": "application/json"}).json()
    expected = artifact.decode(torch.tensor(z))[:, 0]
    torch.testing.assert_close(torch.tensor(body["images"]), expected, rtol=0, atol=1e-5)


def test_single_decoded_image_is_28x28(client: TestClient) -> None:
    r = client.post("/decode?format=png", json={"z": [[0.0, 0.0]]})
    assert Image.open(io.BytesIO(r.content)).size == (28, 28)


def test_sample_seed_reproducible_and_json_forms(client: TestClient, artifact) -> None:
    a = client.get("/sample?n=16&seed=42")
    b = client.get("/sample?n=16&seed=42")
    c = client.get("/sample?n=16&seed=43")
    assert a.status_code == 200 and a.headers["content-type"] == "image/png" and a.headers["x-seed"] == "42"
    assert a.content == b.content != c.content
    assert Image.open(io.BytesIO(a.content)).size == (4 * 30 + 2, 4 * 30 + 2)
    body = client.get("/sample?n=3&seed=42&format=json").json()
    z = torch.randn(3, 2, generator=torch.Generator().manual_seed(42))
    torch.testing.assert_close(torch.tensor(body["z"]), z)
    torch.testing.assert_close(torch.tensor(body["images"]), artifact.decode(z)[:, 0], rtol=0, atol=1e-5)
    b64 = client.get("/sample?n=3&seed=42&format=json&encoding=base64").json()
    assert len(b64["png_base64"]) == 3
    assert Image.open(io.BytesIO(base64.b64decode(b64["png_base64"][0]))).size == (28, 28)
    cooler = client.get("/sample?n=3&seed=42&format=json&temperature=0.5").json()
    torch.testing.assert_close(torch.tensor(cooler["z"]), z * 0.5)


def test_sample_without_seed_returns_the_seed_used(client: TestClient) -> None:
    body = client.get("/sample?n=2&format=json").json()
    again = client.get(f"/sample?n=2&format=json&seed={body['seed']}").json()
    assert again["images"] == body["images"]


def test_reconstruct_png_pairs_and_json(client: TestClient, artifact) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in DIGITS[:3]]
    r = client.post("/reconstruct", files=files)
    assert r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (2 * 30 + 2, 3 * 30 + 2)
    body = client.post("/reconstruct?format=json", content=DIGIT, headers={"content-type": "image/png"}).json()
    x = prep(DIGIT)[None]
    mu, _ = artifact.encode(x)
    torch.testing.assert_close(torch.tensor(body["images"][0]), artifact.decode(mu)[0, 0], rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.tensor(body["originals"][0]), x[0, 0], rtol=0, atol=1e-5)


# --- anomaly score ---------------------------------------------------------------------

def test_anomaly_score_matches_artifact_and_calibration(client: TestClient, artifact) -> None:
    body = client.post("/anomaly-score?k=32&seed=5&method=bound", content=DIGIT,
                       headers={"content-type": "image/png"}).json()
    eps = torch.randn(32, 1, 2, generator=torch.Generator().manual_seed(5))
    expected = -artifact.log_likelihood_with_noise(prep(DIGIT)[None], eps)[0].detach()
    assert body["k"] == 32 and body["threshold_percentile"] == 99.0 and body["method"] == "bound"
    assert math.isclose(body["score"], float(expected), rel_tol=1e-5)
    models = {m["name"]: m for m in client.get("/models").json()["models"]}
    calibration = models["vae"]["anomaly_calibration"]
    assert body["calibration_k"] == calibration["k"]
    assert math.isclose(body["threshold"], calibration["quantiles"]["p99"], rel_tol=1e-6)
    assert 0 <= body["percentile"] <= 100
    assert body["is_anomaly"] == (body["score"] > body["threshold"])


def test_noise_scores_higher_than_digits(client: TestClient) -> None:
    noise = png_of(Image.fromarray(torch.randint(0, 256, (28, 28), dtype=torch.uint8, generator=torch.Generator()
                                                 .manual_seed(0)).numpy(), "L"))
    files = [("file", ("d.png", DIGIT, "image/png")), ("file", ("n.png", noise, "image/png"))]
    digit, rand = client.post("/anomaly-score?invert=false", files=files).json()["results"]
    assert rand["score"] > digit["score"] and rand["is_anomaly"] and rand["percentile"] == 100.0


def test_score_depends_on_image_and_seed_only(client: TestClient) -> None:
    files = [("file", (p.name, p.read_bytes(), "image/png")) for p in DIGITS]
    batch = client.post("/anomaly-score?seed=3", files=files).json()["results"]
    for i in (0, 2):
        alone = client.post("/anomaly-score?seed=3", files=files[i : i + 1]).json()
        assert math.isclose(batch[i]["score"], alone["score"], rel_tol=1e-5)


# --- real-world images -----------------------------------------------------------------

def test_photo_of_dark_digit_is_inverted_levelled_and_centred() -> None:
    x = prep(PHOTO)[0]
    assert x.shape == (28, 28)
    border = torch.cat([x[0], x[-1], x[:, 0], x[:, -1]])
    assert float(border.max()) < 0.05  # black background, as MNIST
    assert float(x.max()) > 0.9  # a white digit
    ys, xs = torch.nonzero(x > 0.3, as_tuple=True)
    assert 9 <= float(ys.float().mean()) <= 19 and 9 <= float(xs.float().mean()) <= 19


def test_served_pixels_are_the_training_pixels_bit_for_bit(mnist) -> None:
    """The service converts uploads to floats in numpy, training in torch: every grey level and a
    real MNIST test digit must come out as the very same float32 values."""
    levels = np.zeros((28, 28), dtype=np.uint8)  # every grey level inside a black border (no levelling)
    levels[1:-1, 1:-1] = (np.arange(26 * 26) % 256).reshape(26, 26)
    buf = io.BytesIO()
    Image.fromarray(levels, "L").save(buf, "PNG")
    served = files_to_tensor([buf.getvalue(), DIGIT], 784, Preprocess())
    expected = to_float(torch.stack([torch.from_numpy(levels), mnist.test_images[0]]))
    assert served.dtype == expected.dtype and torch.equal(served, expected)


@pytest.mark.parametrize(("count", "nrow"), [(2, 2), (5, 3), (7, 2), (16, 4), (64, 8)])
def test_grid_matches_torchvision_make_grid(count: int, nrow: int) -> None:
    images = torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(count))
    expected = make_grid(images, nrow=nrow, padding=2, pad_value=0.5)[:1]
    assert torch.equal(grid(images, nrow), expected)
    png = decode_png(torch.frombuffer(bytearray(to_png(images, nrow)), dtype=torch.uint8))
    assert torch.equal(png, expected.mul(255).round().to(torch.uint8))


def test_preprocessing_switches(client: TestClient) -> None:
    inverted = png_of(Image.fromarray(255 - prep(DIGIT)[0].mul(255).round().byte().numpy(), "L"))
    auto = prep(inverted)
    torch.testing.assert_close(auto, prep(DIGIT), rtol=0, atol=1.5 / 255)
    forced = file_to_tensor(DIGIT, 10**8, Preprocess(invert="true"))
    assert float(forced[0, 0, 0]) == 1.0  # background turned white
    big = png_of(Image.new("L", (40, 30), 0))
    r = client.post("/encode?fit=false", content=big, headers={"content-type": "image/png"})
    assert r.status_code == 422 and "28x28" in r.json()["detail"]


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "RGB", "LA", "1"])
def test_image_modes_are_accepted(client: TestClient, mode: str) -> None:
    base = Image.open(io.BytesIO(DIGIT))
    img = base.convert(mode) if mode != "I;16" else Image.fromarray(prep(DIGIT)[0].mul(65535).numpy().astype("uint16"))
    r = client.post("/encode", content=png_of(img), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "JPEG", "BMP", "TIFF"])
def test_other_formats_are_accepted(client: TestClient, fmt: str) -> None:
    buf = io.BytesIO()
    Image.open(io.BytesIO(DIGIT)).save(buf, fmt)
    r = client.post("/encode", content=buf.getvalue(), headers={"content-type": "application/octet-stream"})
    assert r.status_code == 200, r.text


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize(("kwargs", "status", "error"), [
    ({"content": b"", "headers": {"content-type": "image/png"}}, 422, "empty image"),
    ({"content": DIGIT[:60], "headers": {"content-type": "image/png"}}, 415, "cannot decode image"),
    ({"content": b"<svg xmlns='http://www.w3.org/2000/svg'/>", "headers": {"content-type": "image/png"}}, 415,
     "cannot decode image"),
    ({"content": bomb_png(100_000, 100_000), "headers": {"content-type": "image/png"}}, 413, "image too large"),
    ({"content": b"x" * 2_000_001, "headers": {"content-type": "image/png"}}, 413, "request body too large"),
    ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported media type"),
    ({"content": b"{not json", "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    ({"json": {"images": ["%%%"]}}, 422, "invalid request"),
    ({"json": {"pixels": [[[0.5] * 28] * 27]}}, 422, "invalid request"),
    ({"json": {"pixels": [[[2.0] * 28] * 28]}}, 422, "invalid request"),
    ({"json": {"pixels": [[[True] * 28] * 28]}}, 422, "invalid request"),
    ({"json": {"pixels": [[["0.5"] * 28] * 28]}}, 422, "invalid request"),
    ({"json": {}}, 422, "invalid request"),
    ({"json": {"pixels": [[[0.0] * 28] * 28] * 9}}, 413, "batch too large"),
    ({"files": [("file", ("a.png", DIGIT, "image/png"))] * 9}, 413, "batch too large"),
    ({"files": [("other", ("a.png", DIGIT, "image/png"))]}, 422, "invalid request"),
])
def test_bad_images_get_clear_errors(client: TestClient, kwargs: dict, status: int, error: str) -> None:
    for path in ("/encode", "/reconstruct", "/anomaly-score"):
        r = client.post(path, **kwargs)
        assert r.status_code == status, (path, r.text)
        assert r.json()["error"] == error


@pytest.mark.parametrize(("body", "status"), [
    ({"z": [[0.0, 0.0, 0.0]]}, 422),
    ({"z": [[0.0]]}, 422),
    ({"z": []}, 422),
    ({"z": [0.0, 0.0]}, 422),
    ({"z": [[[0.0, 0.0]]]}, 422),
    ({"z": [[1e308, 0.0]]}, 422),
    ({"z": [[True, 0.0]]}, 422),
    ({"z": [["0.5", 0.0]]}, 422),
    ({"z": [[0.0, 0.0]] * 9}, 413),
])
def test_bad_latents(client: TestClient, body: dict, status: int) -> None:
    r = client.post("/decode", json=body)
    assert r.status_code == status, r.text
    assert "error" in r.json()


def test_latent_errors_say_what_to_fix(client: TestClient) -> None:
    assert client.post("/decode", json={"z": [[0.0, 0.0]] * 9}).json() == {
        "error": "batch too large", "detail": "9 vectors; the limit is 8 (VAE_MAX_BATCH)"}
    assert client.post("/decode", json={"z": [[0.0, 0.0], [0.0, 0.0, 1.0]]}).json() == {
        "error": "wrong latent size", "detail": "z[1] has 3 values; model 'vae' has latent_dim=2"}
    files = [("file", ("a.png", DIGIT, "image/png"))] * 9
    assert client.post("/encode", files=files).json() == {
        "error": "batch too large", "detail": "9 images; the limit is 8 (VAE_MAX_BATCH)"}


def test_k_limit_is_inclusive_and_says_so(client: TestClient) -> None:
    assert client.post("/anomaly-score?k=256", content=DIGIT, headers={"content-type": "image/png"}).json()["k"] == 256
    r = client.post("/anomaly-score?k=257", content=DIGIT, headers={"content-type": "image/png"})
    assert r.status_code == 422
    assert r.json() == {"error": "k too large", "detail": "k=257; the limit is 256 (VAE_MAX_K)"}


def test_multipart_file_and_field_limits(client: TestClient) -> None:
    one = [("file", ("a.png", DIGIT, "image/png"))]
    assert client.post("/encode", files=one * 8).status_code == 200  # VAE_MAX_BATCH=8 files: served
    r = client.post("/encode", files=one * 10)  # refused while parsing, before reading them all
    assert r.status_code == 413 and r.json() == {"error": "batch too large",
                                                 "detail": "more than 8 files; the limit is 8 (VAE_MAX_BATCH)"}
    fields = {f"note{i}": "x" for i in range(20)}  # some text fields beside the files are fine ...
    assert client.post("/encode", files=one, data=fields).status_code == 200
    r = client.post("/encode", files=one, data={f"note{i}": "x" for i in range(40)})  # ... but not without end
    assert r.status_code == 400 and r.json()["error"] == "malformed multipart body"


def test_png_output_clamps_to_the_pixel_range() -> None:
    png = to_png(torch.tensor([-0.5, 0.0, 0.5, 1.0, 1.5]).repeat(5, 1)[None, None])
    assert decode_png(torch.frombuffer(bytearray(png), dtype=torch.uint8))[0, 0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_latents(client: TestClient, literal: str) -> None:
    r = client.post("/decode", content=f'{{"z": [[{literal}, 0.0]]}}', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["z", 0, 0]


@pytest.mark.parametrize(("query", "status"), [
    ("n=0", 422), ("n=-1", 422), ("n=abc", 422), (f"n={10**9}", 413), ("n=65", 413),
    ("temperature=0", 422), ("temperature=nan", 422), ("format=gif", 422), ("model=nope", 404),
])
def test_bad_sample_queries(client: TestClient, query: str, status: int) -> None:
    r = client.get(f"/sample?{query}")
    assert r.status_code == status, r.text
    assert r.json()["error"]


def test_query_errors_name_the_parameter_and_unknown_ones_are_ignored(client: TestClient) -> None:
    r = client.get("/sample?n=abc&temperature=0")
    assert r.status_code == 422
    assert sorted(d["loc"] for d in r.json()["detail"]) == [["query", "n"], ["query", "temperature"]]
    assert client.get("/sample?n=2&seed=1&whatever=1").headers["x-seed"] == "1"


@pytest.mark.parametrize(("query", "status"), [("k=0", 422), ("k=257", 422), ("threshold_percentile=100", 422),
                                               ("model=nope", 404), ("method=nope", 422),
                                               ("model=deep-tiny&method=fisher", 422)])
def test_bad_anomaly_queries(client: TestClient, query: str, status: int) -> None:
    r = client.post(f"/anomaly-score?{query}", content=DIGIT, headers={"content-type": "image/png"})
    assert r.status_code == status, r.text


def test_format_rule(client: TestClient) -> None:
    png = {"accept": "image/png"}
    js = {"accept": "application/json"}
    assert client.get("/sample?n=1&seed=1", headers=js).headers["content-type"] == "application/json"
    assert client.get("/sample?n=1&seed=1&format=png", headers=js).headers["content-type"] == "image/png"
    assert client.get("/sample?n=1&seed=1", headers={"accept": "text/html,*/*"}).headers["content-type"] == "image/png"
    both = {"accept": "image/png;q=0.5, application/json"}
    assert client.get("/sample?n=1&seed=1", headers=both).headers["content-type"] == "application/json"
    assert client.post("/encode", content=DIGIT, headers={"content-type": "image/png", **png}).status_code == 406


def test_request_id_is_echoed_or_made(client: TestClient) -> None:
    assert client.get("/healthz", headers={"x-request-id": "abc-123"}).headers["x-request-id"] == "abc-123"
    assert len(client.get("/healthz").headers["x-request-id"]) == 32


def test_access_log_is_one_json_line_per_request(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="app.access")
    client.post("/encode?model=deep-tiny", content=DIGIT, headers={"content-type": "image/png", "x-request-id": "a1"})
    client.post("/encode", content=b"x" * 2_000_001, headers={"content-type": "image/png", "x-request-id": "a2"})
    client.get("/healthz", headers={"x-request-id": "a3"})
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "app.access"]
    assert [0 <= line.pop("latency_ms") < 10_000 for line in lines] == [True] * 3
    assert lines == [
        {"request_id": "a1", "method": "POST", "path": "/encode", "query": "model=deep-tiny", "status": 200,
         "model": "deep-tiny"},
        {"request_id": "a2", "method": "POST", "path": "/encode", "query": "", "status": 413},  # refused unread
        {"request_id": "a3", "method": "GET", "path": "/healthz", "query": "", "status": 200},
    ]


def test_a_crash_is_a_json_500_that_keeps_the_request_id(models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    app = create_app(settings(models_dir))

    @app.get("/crash")
    async def crash() -> None:
        raise RuntimeError("a bug")

    with TestClient(app) as c:
        r = c.get("/crash", headers={"x-request-id": "rid-500"})
        assert r.status_code == 500 and r.headers["x-request-id"] == "rid-500"
        assert r.json() == {"error": "internal error", "detail": "RuntimeError"}
        assert c.get("/crash").headers["x-request-id"]  # made up when the client sent none
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)  # the traceback is logged


def test_png_from_a_json_only_endpoint_is_406_by_query_or_accept(client: TestClient) -> None:
    by_query = client.post("/encode?format=png", content=DIGIT, headers={"content-type": "image/png"})
    by_accept = client.post("/encode", content=DIGIT, headers={"content-type": "image/png", "accept": "image/png"})
    assert by_query.status_code == by_accept.status_code == 406
    assert by_query.json() == by_accept.json() == {"error": "format not available",
                                                   "detail": "this endpoint answers json"}


def test_undecodable_bytes_get_a_message_without_object_reprs(client: TestClient) -> None:
    r = client.post("/encode", content=b"not an image", headers={"content-type": "image/png"})
    assert r.status_code == 415
    assert r.json()["detail"] == "12 bytes in no image format Pillow reads (PNG, JPEG, GIF, WebP, BMP, TIFF, ...)"


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_service(client: TestClient, page: str) -> None:
    html = client.get(page).text
    refs = re.findall(r"""(?:src|href|spec-url)=["']([^"']+)["']|url: ?["']([^"']+)["']""", html)
    urls = [a or b for a, b in refs]
    assert any(u.endswith(".js") for u in urls) and "/openapi.json" in urls
    for url in urls:
        assert url.startswith("/"), f"{page} loads {url} from outside the service"
        r = client.get(url)
        assert r.status_code == 200 and len(r.content) > 100, url
    if page == "/docs":
        assert client.get("/docs/oauth2-redirect").status_code == 200


def test_home_is_the_page_and_all_it_loads_is_local(client: TestClient) -> None:
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert r.headers["cache-control"] == "no-cache"
    refs = re.findall(r"""(?:src|href)=["']([^"']+)["']""", r.text)
    assert {"static/page.js", "static/page.css", "docs"} <= set(refs)
    for ref in refs:
        assert not re.match(r"[a-z]+:|//", ref), f"the page loads {ref} from outside the service"
        asset = client.get("/" + ref)
        assert asset.status_code == 200 and len(asset.content) > 100, ref
    script = client.get("/static/page.js")
    assert script.headers["content-type"].startswith("text/javascript")
    assert script.headers["cache-control"] == "no-cache"
    assert "http://" not in script.text and "https://" not in script.text  # no CDN, no external fonts
    assert client.get("/static/nope.js").status_code == 404


def test_without_the_page_home_redirects_to_the_docs(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir, page=False))) as c:
        r = c.get("/", follow_redirects=False)
        assert r.status_code == 307 and r.headers["location"] == "/docs"
        assert c.get("/static/page.js").status_code == 404
        assert c.get("/models/vae/latent-map").status_code == 200  # the API keeps the map


def test_openapi_documents_bodies_and_png(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    encode = spec["paths"]["/encode"]["post"]
    assert {"image/png", "multipart/form-data", "application/json"} <= set(encode["requestBody"]["content"])
    assert "image/png" in spec["paths"]["/sample"]["get"]["responses"]["200"]["content"]
    assert client.get("/docs").status_code == 200
    for path, method in [("/decode", "post"), ("/sample", "get"), ("/reconstruct", "post")]:
        responses = spec["paths"][path][method]["responses"]
        assert next(iter(responses["200"]["content"])) == "image/png"  # the default first: generated clients read it
        assert list(responses["404"]["content"]) == ["application/json"]  # errors stay JSON
    assert next(iter(encode["requestBody"]["content"])) == "application/octet-stream"
    assert spec["info"]["title"] == "MNIST VAE service" and spec["openapi"].startswith("3.")


# --- start-up failures -----------------------------------------------------------------

def start(folder: Path, **kw) -> None:
    with TestClient(create_app(settings(folder, **kw))):
        pass


def test_broken_model_file_fails_startup(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "vae.pt").write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        start(tmp_path)
    assert any("vae.pt" in r.getMessage() and "TorchScript" in r.getMessage() for r in caplog.records)


def test_lying_meta_fails_startup(tmp_path: Path, models_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    module, meta = export.load(models_dir / "vae.pt")
    export.save(module, tmp_path / "vae.pt", {**meta, "latent_dim": 5})
    with pytest.raises(ModelLoadError):
        start(tmp_path)
    assert any("latent_dim=5" in r.getMessage() for r in caplog.records)


def test_empty_folder_and_missing_default_fail_startup(tmp_path: Path, models_dir: Path) -> None:
    with pytest.raises(ModelLoadError):
        start(tmp_path)
    with pytest.raises(ModelLoadError):
        start(models_dir, default_model="absent")


def test_models_name_each_artifact_file(client: TestClient) -> None:
    files = {m["name"]: m["file"] for m in client.get("/models").json()["models"]}
    assert files == {"vae": "vae.pt", "deep-tiny": "deep-tiny.pt"}


def test_integer_pixels_and_latents_are_numbers_too(client: TestClient, artifact) -> None:
    """JSON has one number type: 0 and 1 written without a decimal point are still pixels and latents."""
    ints = [[1 if 8 <= c <= 19 and 4 <= r <= 23 else 0 for c in range(28)] for r in range(28)]
    floats = [[float(v) for v in row] for row in ints]
    a = client.post("/encode", json={"pixels": [ints]}).json()
    b = client.post("/encode", json={"pixels": [floats]}).json()
    assert a == b and len(a["mu"]) == 2
    z_int = client.post("/decode?format=json", json={"z": [[1, -1]]}).json()["images"]
    z_float = client.post("/decode?format=json", json={"z": [[1.0, -1.0]]}).json()["images"]
    assert z_int == z_float


def test_sample_limit_is_inclusive_and_says_so(client: TestClient) -> None:
    assert client.get("/sample?n=64&seed=1").status_code == 200  # max_samples=64 in this app
    r = client.get("/sample?n=65")
    assert r.status_code == 413
    assert r.json() == {"error": "too many samples", "detail": "n=65; the limit is 64 (VAE_MAX_SAMPLES)"}


def test_body_errors_say_where(client: TestClient) -> None:
    broken = client.post("/encode", content=b'{"pixels": [1,', headers={"content-type": "application/json"})
    assert broken.status_code == 400 and broken.json()["error"] == "malformed JSON"
    assert broken.json()["detail"] == "EOF while parsing a value at line 1 column 14"  # where it broke
    good = base64.b64encode(DIGIT).decode()
    r = client.post("/encode", json={"images": [good, "%%%"]})
    assert r.status_code == 422 and r.json()["detail"] == "images[1] is not valid base64"


def test_multipart_errors_say_what_is_wrong(client: TestClient) -> None:
    r = client.post("/encode", files=[("other", ("a.png", DIGIT, "image/png"))])
    assert r.json() == {"error": "invalid request",
                        "detail": "multipart body needs one or more 'file' fields holding images"}
    broken = client.post("/encode", content=b"--x\r\nContent-Disposition: form-data\r\n\r\nab\r\n--x--\r\n",
                         headers={"content-type": "multipart/form-data; boundary=x"})
    assert broken.status_code == 400 and broken.json() == {  # the parser's own words
        "error": "malformed multipart body",
        "detail": '400: The Content-Disposition header field "name" must be provided.'}


def test_startup_failure_is_reported_once(tmp_path: Path) -> None:
    """uvicorn prints a failed lifespan's message; the service logs the reason itself, so the message
    it sends up is empty (one clear line instead of a traceback twice)."""
    app = create_app(settings(tmp_path))  # an empty models folder
    sent: list[dict] = []
    incoming = [{"type": "lifespan.startup"}]

    async def receive() -> dict:
        return incoming.pop() if incoming else {"type": "lifespan.shutdown"}

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}, receive, send)

    with pytest.raises(Exception, match=r"no \*\.pt or <name>/<version>/model\.pt model files"):
        asyncio.run(run())
    assert sent == [{"type": "lifespan.startup.failed", "message": ""}]


def test_body_kind_errors_say_what_to_send(client: TestClient) -> None:
    bare = client.post("/encode", content=DIGIT, headers={"content-type": ""})
    assert bare.status_code == 415 and bare.json()["detail"] == (
        "got no Content-Type; send image/* or application/octet-stream (raw bytes), multipart/form-data with "
        "field 'file', or application/json with 'images' or 'pixels'")
    text = client.post("/encode", content=b"x", headers={"content-type": "Text/Plain; charset=utf-8"})
    assert text.json()["detail"].startswith("got text/plain; send image/*")
    both = client.post("/encode", json={"images": [base64.b64encode(DIGIT).decode()], "pixels": [[[0.0] * 28] * 28]})
    assert both.status_code == 422
    assert both.json()["detail"] == "give exactly one of 'images' (base64 files) or 'pixels'"


def test_json_pixels_reconstruct_with_their_originals(client: TestClient) -> None:
    pixels = [[[round((r * 28 + c) / 784, 5) for c in range(28)] for r in range(28)] for _ in range(2)]
    body = client.post("/reconstruct?format=json", json={"pixels": pixels}).json()
    assert body["originals"] == pixels and len(body["images"]) == 2
    assert all(len(img) == 28 and len(img[0]) == 28 for img in body["images"])


def test_access_log_latency_is_milliseconds_to_two_places(caplog: pytest.LogCaptureFixture, monkeypatch) -> None:
    import app.middleware as middleware

    class Frozen:
        @staticmethod
        def perf_counter() -> float:
            return 100.0123456

    monkeypatch.setattr(middleware, "time", Frozen)
    caplog.set_level("INFO", logger="app.access")
    mw = middleware.ServiceMiddleware(None, middleware.HttpLimits())  # type: ignore[arg-type]
    mw._done({"method": "GET", "path": "/healthz", "query_string": b"a=1"}, "r1", 200, start=100.0)
    (line,) = [json.loads(r.getMessage()) for r in caplog.records if r.name == "app.access"]
    assert line == {"request_id": "r1", "method": "GET", "path": "/healthz", "query": "a=1", "status": 200,
                    "latency_ms": 12.35}
