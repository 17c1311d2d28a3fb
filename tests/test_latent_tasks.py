"""What only a VAE answers: the path between two digits (/interpolate), samples of a chosen digit
(/sample?digit=), the nearest real digits (/similar), and the artifact parts behind them."""

from __future__ import annotations

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

from app.artifacts import ModelLoadError, load_model
from app.contract import LATENT_MAP_FILE, NEIGHBOURS_FILE, neighbours, neighbours_file
from app.inference import path_between
from app.main import create_app
from app.neighbours import NeighbourIndex
from app.settings import Settings
from tests.conftest import DATA_DIR, REPO, TEST_DATA
from training import export
from training import neighbours as index_command
from training.data import to_float

SEVEN = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
TWO = (TEST_DATA / "mnist_test_1_digit_2.png").read_bytes()
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as c:
        yield c


@pytest.fixture(scope="module")
def vae(models_dir: Path) -> torch.jit.ScriptModule:
    return export.load(models_dir / "vae.pt")[0]


def pair() -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", ("seven.png", SEVEN, "image/png")), ("file", ("two.png", TWO, "image/png"))]


# --- the path between two digits ----------------------------------------------------------

def test_slerp_follows_the_arc_and_linear_the_line() -> None:
    a, b = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 3.0])
    arc = path_between(a, b, 3, "slerp")
    assert np.allclose(arc, [[3, 0], [3 / math.sqrt(2), 3 / math.sqrt(2)], [0, 3]], atol=1e-6)
    assert np.allclose(path_between(a, b, 3, "linear"), [[3, 0], [1.5, 1.5], [0, 3]], atol=1e-6)
    short = path_between(a, torch.tensor([0.0, 1.0]), 3, "slerp")  # norms 3 and 1: the midpoint's lies between
    assert short[0].tolist() == pytest.approx([3, 0]) and short[2].tolist() == pytest.approx([0, 1], abs=1e-6)
    assert 1 < float(short[1].norm()) < 3
    parallel = path_between(a, 2 * a, 3, "slerp")  # no angle between them: the line
    assert np.allclose(parallel, [[3, 0], [4.5, 0], [6, 0]], atol=1e-6)
    assert np.allclose(path_between(torch.zeros(2), b, 3, "slerp"), [[0, 0], [0, 1.5], [0, 3]], atol=1e-6)


def test_the_path_starts_and_ends_at_the_two_reconstructions(client: TestClient, vae: torch.jit.ScriptModule) -> None:
    body = client.post("/interpolate?steps=5&format=json", files=pair()).json()
    assert body["model"] == "vae" and body["path"] == "slerp" and len(body["z"]) == len(body["images"]) == 5
    mu = [client.post("/encode", content=d, headers=PNG).json()["mu"] for d in (SEVEN, TWO)]
    assert body["z"][0] == pytest.approx(mu[0], abs=1e-5) and body["z"][-1] == pytest.approx(mu[1], abs=1e-5)
    recon = client.post("/reconstruct?format=json", files=pair()).json()["images"]
    assert np.allclose(body["images"][0], recon[0], atol=1e-5) and np.allclose(body["images"][-1], recon[1], atol=1e-5)
    decoded = vae.decode(torch.tensor(body["z"]))[:, 0].numpy()
    assert np.allclose(body["images"], decoded, atol=1e-5)
    linear = client.post("/interpolate?steps=3&path=linear&format=json", files=pair()).json()
    assert linear["z"][1] == pytest.approx(((np.array(mu[0]) + np.array(mu[1])) / 2).tolist(), abs=1e-5)


def test_the_path_from_latent_vectors_and_as_a_png_strip(client: TestClient) -> None:
    r = client.post("/interpolate?steps=6", json={"z": [[0.0, 0.0], [1.0, -1.0]]})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).size == (6 * 30 + 2, 32)  # one row of six tiles
    body = client.post("/interpolate?steps=2&path=linear&format=json", json={"z": [[0.0, 0.0], [1.0, -1.0]]}).json()
    assert body["z"] == [[0.0, 0.0], [1.0, -1.0]]


@pytest.mark.parametrize(("send", "status", "says"), [
    (lambda c: c.post("/interpolate", content=SEVEN, headers=PNG), 422, "exactly two images"),
    (lambda c: c.post("/interpolate", json={"z": [[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]}), 422, "at most 2"),
    (lambda c: c.post("/interpolate", json={"z": [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]}), 422, "latent_dim=2"),
    (lambda c: c.post("/interpolate", json={}), 422, "exactly one of"),
    (lambda c: c.post("/interpolate?steps=1", json={"z": [[0.0, 0.0], [1.0, 1.0]]}), 422, "greater than or equal"),
    (lambda c: c.post("/interpolate?steps=100000", json={"z": [[0.0, 0.0], [1.0, 1.0]]}), 413, "VAE_MAX_SAMPLES"),
    (lambda c: c.post("/interpolate?path=curved", json={"z": [[0.0, 0.0], [1.0, 1.0]]}), 422, "slerp"),
])
def test_interpolate_says_what_to_fix(client: TestClient, send, status: int, says: str) -> None:
    r = send(client)
    assert r.status_code == status and says in r.text


# --- samples of one digit -------------------------------------------------------------------

def test_a_digit_is_drawn_from_its_gaussian_in_the_artifact(client: TestClient, vae: torch.jit.ScriptModule) -> None:
    means, trils = vae.digit_gaussians()
    body = client.get("/sample?digit=3&n=5&seed=11&temperature=0.5&format=json").json()
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(11)) * 0.5
    assert np.allclose(body["z"], means[3] + eps @ trils[3].T, atol=1e-6)
    assert np.allclose(body["images"], vae.decode(torch.tensor(body["z"]))[:, 0].numpy(), atol=1e-5)  # 5 decimals
    other = client.get("/sample?digit=8&n=5&seed=11&temperature=0.5&format=json").json()
    assert other["z"] != body["z"]  # the digit's Gaussian, not the prior's
    assert client.get("/sample?digit=3&n=5&seed=11&temperature=0.5&format=json").json()["z"] == body["z"]
    default = client.get("/sample?digit=3&n=5&seed=11&format=json").json()  # a digit's default temperature: 0.8
    eps = torch.randn(5, 2, generator=torch.Generator().manual_seed(11)) * 0.8
    assert np.allclose(default["z"], means[3] + eps @ trils[3].T, atol=1e-6)
    prior = client.get("/sample?n=5&seed=11&format=json").json()  # without a digit: 1, as always
    assert np.allclose(prior["z"], torch.randn(5, 2, generator=torch.Generator().manual_seed(11)), atol=1e-6)


def test_a_model_without_digit_gaussians_says_so(client: TestClient) -> None:
    r = client.get("/sample?digit=3&model=deep-tiny")
    assert r.status_code == 422 and "carries no per-digit latent Gaussians" in r.json()["detail"]
    assert client.get("/sample?digit=10").status_code == 422


def test_the_sample_protocol_model_takes_a_digit(client: TestClient) -> None:
    body = {"inputs": [{"name": "digit", "datatype": "INT32", "shape": [1], "data": [3]},
                       {"name": "seed", "datatype": "INT64", "shape": [1], "data": [11]},
                       {"name": "n", "datatype": "INT32", "shape": [1], "data": [2]}]}
    out = {o["name"]: o for o in client.post("/v2/models/vae.sample/infer", json=body).json()["outputs"]}
    rest = client.get("/sample?digit=3&n=2&seed=11&format=json").json()
    assert out["z"]["data"] == pytest.approx([v for row in rest["z"] for v in row], abs=1e-6)


# --- the nearest real digits ------------------------------------------------------------------

def brute_force(index_mu: np.ndarray, z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    d = np.sqrt(((index_mu.astype(np.float64) - z.astype(np.float64)) ** 2).sum(1))
    order = np.lexsort((np.arange(len(d)), d))[:k]  # by distance, then by row
    return order, d[order]


def test_neighbours_are_the_nearest_training_digits_by_posterior_mean(client: TestClient, models_dir: Path,
                                                                     vae: torch.jit.ScriptModule, mnist) -> None:
    mu, labels, images = neighbours(export.extra_file(models_dir / "vae.pt", NEIGHBOURS_FILE) or b"", 2)
    n = len(mu)
    assert n == 2000 and np.array_equal(images, mnist.train_images[:n].numpy())  # the tiny models' 2,000
    assert np.array_equal(labels, mnist.train_labels[:n].numpy())
    with torch.no_grad():
        assert np.allclose(mu, vae.encode(to_float(mnist.train_images[:n]))[0].numpy(), atol=1e-5)
    body = client.post("/similar?k=5", content=SEVEN, headers=PNG).json()
    assert body["model"] == "vae" and body["k"] == 5
    q = np.array(client.post("/encode", content=SEVEN, headers=PNG).json()["mu"], np.float32)
    rows, dist = brute_force(mu, q, 5)
    assert [x["index"] for x in body["neighbours"]] == rows.tolist()
    assert [x["distance"] for x in body["neighbours"]] == pytest.approx(dist.tolist(), rel=1e-5, abs=1e-6)
    assert [x["label"] for x in body["neighbours"]] == labels[rows].tolist()


def test_a_batch_gets_results_and_the_png_shows_each_image_then_its_neighbours(client: TestClient, models_dir: Path
                                                                               ) -> None:
    body = client.post("/similar?k=3", files=pair()).json()
    assert len(body["results"]) == 2 and all(len(r["neighbours"]) == 3 for r in body["results"])
    one = client.post("/similar?k=3", content=TWO, headers=PNG).json()["neighbours"]
    assert body["results"][1]["neighbours"] == one
    r = client.post("/similar?k=3&format=png", files=pair())
    grid = np.asarray(Image.open(io.BytesIO(r.content)))
    assert grid.shape == (2 * 30 + 2, 4 * 30 + 2)  # two rows: the image, then three neighbours
    _, _, images = neighbours(export.extra_file(models_dir / "vae.pt", NEIGHBOURS_FILE) or b"", 2)
    first = body["results"][0]["neighbours"][0]["index"]
    assert np.array_equal(grid[2:30, 32:60], images[first])  # the nearest, pixel for pixel
    assert np.array_equal(grid[2:30, 2:30], np.asarray(Image.open(io.BytesIO(SEVEN))))  # the query as seen


def test_similar_says_what_to_fix(client: TestClient) -> None:
    r = client.post("/similar?k=101", content=SEVEN, headers=PNG)
    assert r.status_code == 422 and "VAE_MAX_NEIGHBOURS" in r.text
    assert client.post("/similar?k=0", content=SEVEN, headers=PNG).status_code == 422


def test_the_similar_protocol_model_answers_as_rest(client: TestClient) -> None:
    body = {"inputs": [{"name": "image_files", "datatype": "BYTES", "shape": [1],
                        "data": [base64.b64encode(SEVEN).decode()]}], "parameters": {"k": 4}}
    r = client.post("/v2/models/vae.similar/infer", json=body)
    out = {o["name"]: o for o in r.json()["outputs"]}
    rest = client.post("/similar?k=4", content=SEVEN, headers=PNG).json()["neighbours"]
    assert out["index"]["data"] == [x["index"] for x in rest] and out["index"]["shape"] == [1, 4]
    assert out["label"]["data"] == [x["label"] for x in rest]
    assert out["distance"]["data"] == pytest.approx([x["distance"] for x in rest], rel=1e-6)


def test_search_is_exact_and_breaks_ties_by_row() -> None:
    rng = np.random.default_rng(0)
    mu = rng.normal(size=(5000, 8)).astype(np.float32)
    mu[100] = mu[4000] = mu[7]  # three equal means: a tie
    index = NeighbourIndex(mu, np.zeros(5000, np.uint8), np.zeros((5000, 28, 28), np.uint8), torch.device("cpu"))
    queries = np.concatenate([rng.normal(size=(20, 8)), mu[7:8] + 1e-4]).astype(np.float32)
    found = index.search(torch.from_numpy(queries), 10)
    for q, rows, dist in zip(queries, found.index.numpy(), found.distance.numpy(), strict=True):
        want, want_d = brute_force(mu, q, 10)
        assert rows.tolist() == want.tolist() and dist == pytest.approx(want_d, rel=1e-5, abs=1e-6)
    assert found.index[-1, :3].tolist() == [7, 100, 4000]


@pytest.mark.parametrize(("change", "says"), [
    (lambda a: {**a, "mu": a["mu"].astype(np.float64)}, "float32"),
    (lambda a: {**a, "mu": a["mu"][:, :1]}, "[N, 2]"),
    (lambda a: {**a, "labels": a["labels"] + 10}, "digits 0-9"),
    (lambda a: {**a, "mu": np.full_like(a["mu"], np.nan)}, "finite"),
    (lambda a: {**a, "images": a["images"][:, :27]}, "[3, 28, 28]"),
])
def test_a_bad_neighbour_index_is_refused_naming_the_file(tmp_path: Path, models_dir: Path, change, says: str) -> None:
    good = {"mu": np.zeros((3, 2), np.float32), "labels": np.array([1, 2, 3], np.uint8),
            "images": np.zeros((3, 28, 28), np.uint8)}
    bad = change(good)
    buf = io.BytesIO()
    np.savez(buf, **bad)
    module, meta = export.load(models_dir / "vae.pt")
    path = tmp_path / "vae.pt"
    export.save(module, path, meta, None, buf.getvalue())
    with pytest.raises(ModelLoadError, match=f"{re.escape(str(path))}: {NEIGHBOURS_FILE}: .*{re.escape(says)}"):
        load_model(path, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"not an \.npz"):
        neighbours(b"not a zip", 2)


def test_vae_index_adds_an_index_and_keeps_the_latent_map(tmp_path: Path, models_dir: Path) -> None:
    module, meta = export.load(models_dir / "vae.pt")
    lmap = export.extra_file(models_dir / "vae.pt", LATENT_MAP_FILE)
    bare = tmp_path / "bare.pt"
    export.save(module, bare, meta, json.loads(lmap) if lmap else None)
    assert export.extra_file(bare, NEIGHBOURS_FILE) is None
    bare_model = load_model(bare, torch.device("cpu"))
    assert bare_model.index is None and bare_model.describe()["capabilities"]["similar"] is None
    assert index_command.main([str(bare), "--data-dir", str(DATA_DIR)]) == 0
    mu, labels, _ = neighbours(export.extra_file(bare, NEIGHBOURS_FILE) or b"", 2)
    assert len(mu) == 60000 and np.bincount(labels).tolist()[:2] == [5923, 6742]
    assert export.extra_file(bare, LATENT_MAP_FILE) == lmap
    assert load_model(bare, torch.device("cpu")).describe()["capabilities"]["similar"] == {"digits": 60000}


def test_a_model_without_an_index_says_so(tmp_path: Path, models_dir: Path) -> None:
    module, meta = export.load(models_dir / "vae.pt")
    export.save(module, tmp_path / "vae.pt", meta)
    with TestClient(create_app(Settings(models_dir=tmp_path, default_model="vae"))) as c:
        r = c.post("/similar", content=SEVEN, headers=PNG)
    assert r.status_code == 422 and "carries no neighbour index (add one: vae-index vae.pt)" in r.text


def test_the_index_file_round_trips() -> None:
    mu, labels, images = np.ones((2, 3), np.float32), np.array([4, 5], np.uint8), np.zeros((2, 28, 28), np.uint8)
    back = neighbours(neighbours_file(mu, labels, images, "two"), 3)
    assert all(np.array_equal(a, b) for a, b in zip(back, (mu, labels, images), strict=True))


@pytest.fixture(scope="module")
def shipped() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=REPO / "models", default_model="vae"))) as c:
        yield c


def similar_of(client: TestClient, ink: np.ndarray) -> list[dict]:
    buf = io.BytesIO()
    Image.fromarray(ink).save(buf, "PNG")
    return client.post("/similar?k=5", content=buf.getvalue(), headers=PNG).json()["neighbours"]


@pytest.mark.parametrize("change", ["moved", "bold", "turned"])
def test_a_moved_bold_or_turned_digit_lands_among_its_own_digit(shipped: TestClient, change: str) -> None:
    """The bundled 32-D model: each test digit moved 3 px (within its margin) has exactly the neighbours it
    has where it is; drawn bolder or turned 20 degrees, most of its nearest training digits are still its
    own digit, and the default score still calls it a digit."""
    for path in sorted(TEST_DATA.glob("mnist_test_*_digit_*.png")):
        digit = int(path.stem.rsplit("_", 1)[1])
        ink = np.asarray(Image.open(path))
        if change == "moved":
            ys, xs = np.nonzero(ink)
            varied = np.roll(ink, (-min(3, int(ys.min())), min(3, 27 - int(xs.max()))), axis=(0, 1))
            assert similar_of(shipped, varied) == similar_of(shipped, ink)
        else:
            if change == "bold":
                padded = np.pad(ink, 1)
                varied = np.max([padded[i : i + 28, j : j + 28] for i in range(3) for j in range(3)], axis=0)
            else:
                varied = np.asarray(Image.fromarray(ink).rotate(20, resample=Image.Resampling.BILINEAR))
            labels = [n["label"] for n in similar_of(shipped, varied)]
            assert labels.count(digit) >= 3, (path.name, labels)
        buf = io.BytesIO()
        Image.fromarray(varied).save(buf, "PNG")
        score = shipped.post("/anomaly-score", content=buf.getvalue(), headers=PNG).json()
        assert not score["is_anomaly"], (path.name, score)


def test_models_indexing_the_same_digits_share_one_copy_of_their_pixels(models_dir: Path) -> None:
    vae, deep = (load_model(models_dir / f"{name}.pt", torch.device("cpu")) for name in ("vae", "deep-tiny"))
    assert vae.index is not None and deep.index is not None
    assert vae.index.images is deep.index.images  # the same 2,000 training digits: one array
    assert not np.array_equal(vae.index.mu[:, :2].numpy(), deep.index.mu[:, :2].numpy())  # their own codes
