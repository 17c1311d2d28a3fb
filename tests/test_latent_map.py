"""The latent map: written into 2-D artifacts by training, checked at start-up, served as it is."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from app import contract
from app.artifacts import LatentMap, ModelLoadError, load_model
from app.main import create_app
from app.settings import Settings
from training import export, latent_map
from training.data import MNIST, to_float

EXTRA = {contract.META_FILE: "", contract.LATENT_MAP_FILE: ""}


def read_map(path: Path) -> dict:
    extra = dict(EXTRA)
    torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    return json.loads(extra[contract.LATENT_MAP_FILE])


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as c:
        yield c


def test_block_keeps_every_point_and_a_robust_padded_extent() -> None:
    # 1,001 means on a line from 0 to 10 (step 0.01) and one stray mean at 1,000, which must not stretch the map
    mu = [[i / 100, -i / 100] for i in range(1001)] + [[1000.0, 0.0]]
    block = contract.latent_map_block(mu, [i % 10 for i in range(1002)], "test")
    assert block["n"] == 1002 and block["x"][:3] == [0.0, 0.01, 0.02] and block["y"][-2:] == [-10.0, 0.0]
    assert block["label"][:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    # quantiles 0.1% / 99.9% of 1,002 sorted values: indices int(1.001) = 1 and int(999.999) = 999, so x spans
    # 0.01..9.99 and y -9.99..-0.01, each padded by a tenth (0.998); the stray 1,000 is left outside
    assert block["extent"] == [-0.988, 10.988, -10.988, 0.988]
    assert contract.latent_map(json.loads(json.dumps(block)), 2)["n"] == 1002


def test_block_rounds_to_three_decimals_and_pads_a_single_point() -> None:
    block = contract.latent_map_block([[0.12345, -2.71828]], [3], "one")
    assert block["x"] == [0.123] and block["y"] == [-2.718]
    assert block["extent"] == [-0.877, 1.123, -3.718, -1.718]  # no span: padded by 1 either way


GOOD = {"data": "d", "n": 2, "extent": [-1, 1, -2, 2], "x": [0.5, -0.5], "y": [1.0, 0.0], "label": [0, 9]}


EXTENT = "extent must be [x_min, x_max, y_min, y_max], finite, min < max"
LISTS = "x, y and label must be lists of one length"


@pytest.mark.parametrize(("block", "dim", "message"), [
    (GOOD, 8, "a latent map is for 2-D latents, and this model's latent_dim is 8"),
    ([1, 2], 2, "must be a JSON object"),
    ({**GOOD, "extent": [1, -1, -2, 2]}, 2, EXTENT),
    ({**GOOD, "extent": [1, 1, -2, 2]}, 2, EXTENT),
    ({**GOOD, "extent": [-1, 1, 2, 2]}, 2, EXTENT),
    ({**GOOD, "extent": [-1, 1, -2]}, 2, EXTENT),
    ({**GOOD, "extent": [-1, 1, -2, float("inf")]}, 2, EXTENT),
    ({**GOOD, "x": [0.5]}, 2, LISTS),
    ({**GOOD, "label": "09"}, 2, LISTS),
    ({**GOOD, "y": [1.0, float("nan")]}, 2, "x and y must be finite numbers"),
    ({**GOOD, "x": [0.5, True]}, 2, "x and y must be finite numbers"),
    ({**GOOD, "label": [0, 10]}, 2, "labels must be digits 0-9"),
    ({**GOOD, "label": [0, 1.0]}, 2, "labels must be digits 0-9"),
    ({**GOOD, "label": [0, False]}, 2, "labels must be digits 0-9"),
])
def test_a_bad_map_is_refused_with_the_reason(block: object, dim: int, message: str) -> None:
    with pytest.raises(ValueError) as refused:
        contract.latent_map(block, dim)
    assert str(refused.value) == message
    assert contract.latent_map(GOOD, 2)["label"] == [0, 9]


def test_a_map_reads_back_as_written_and_its_source_may_be_left_out() -> None:
    assert contract.latent_map(GOOD, 2) == {**GOOD, "extent": [-1, 1, -2, 2]}
    assert contract.latent_map({k: v for k, v in GOOD.items() if k != "data"}, 2)["data"] == ""


def test_the_served_map_is_compact_json_gzipped_reproducibly_with_a_content_etag() -> None:
    lmap = LatentMap.of(GOOD)
    assert lmap.body == json.dumps(GOOD, separators=(",", ":")).encode()
    assert gzip.decompress(lmap.gzipped) == lmap.body
    assert lmap.gzipped[4:8] == bytes(4)  # no timestamp: every replica serves the same bytes
    assert lmap.etag == '"' + hashlib.sha256(lmap.body).hexdigest()[:32] + '"'


def test_training_writes_the_test_sets_means_into_2d_artifacts(trained: Path, mnist: MNIST) -> None:
    block = read_map(trained / "vae.pt")
    assert block["n"] == len(mnist.test_labels) == 10_000 and block["label"] == mnist.test_labels.tolist()
    module, _ = export.load(trained / "vae.pt")
    with torch.no_grad():
        mu, _ = module.encode(to_float(mnist.test_images[:500]))
    assert torch.allclose(torch.tensor([block["x"][:500], block["y"][:500]]).T, mu, atol=5.1e-4)
    inside = sum(block["extent"][0] <= x <= block["extent"][1] and block["extent"][2] <= y <= block["extent"][3]
                 for x, y in zip(block["x"], block["y"], strict=True))
    assert inside >= 0.998 * block["n"]
    extra = dict(EXTRA)
    torch.jit.load(str(trained / "deep-tiny.pt"), _extra_files=extra)
    assert extra[contract.LATENT_MAP_FILE] == b""  # 8-D: no map


def test_vae_latent_map_adds_a_map_and_changes_nothing_else(tmp_path: Path, trained: Path, mnist: MNIST,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    module, meta = export.load(trained / "vae.pt")
    bare = tmp_path / "vae.pt"
    export.save(module, bare, meta)  # as exported before maps existed
    assert load_model(bare, torch.device("cpu")).latent_map is None
    data_dir = Path(mnist.folder)
    assert latent_map.main([str(bare), "--data-dir", str(data_dir), "--out", str(tmp_path / "mapped.pt")]) == 0
    assert read_map(tmp_path / "mapped.pt") == read_map(trained / "vae.pt")
    mapped, mapped_meta = export.load(tmp_path / "mapped.pt")
    assert mapped_meta == meta
    x = to_float(mnist.test_images[:16])
    with torch.no_grad():
        assert torch.equal(mapped.encode(x)[0], module.encode(x)[0])
        assert torch.equal(mapped.decode(torch.ones(2, 2)), module.decode(torch.ones(2, 2)))
    assert "10000 test-set means" in capsys.readouterr().out
    deep = tmp_path / "deep.pt"
    shutil.copy(trained / "deep-tiny.pt", deep)
    assert latent_map.main([str(deep), "--data-dir", str(data_dir)]) == 2
    assert "latent_dim 8; a latent map is for 2-D models" in capsys.readouterr().err


@pytest.mark.parametrize(("raw", "message"), [
    (b"{not json", "latent_map.json: Expecting property name"),
    (json.dumps({**GOOD, "label": [0, 12]}).encode(), "latent_map.json: labels must be digits 0-9"),
])
def test_start_up_refuses_a_bad_map_by_file(tmp_path: Path, trained: Path, raw: bytes, message: str) -> None:
    module, meta = export.load(trained / "vae.pt")
    path = tmp_path / "vae.pt"
    torch.jit.save(module, str(path), _extra_files={contract.META_FILE: json.dumps(meta),
                                                    contract.LATENT_MAP_FILE: raw})
    with pytest.raises(ModelLoadError) as e:
        load_model(path, torch.device("cpu"))
    assert str(e.value).startswith(f"{path}: {message}")


def test_the_map_is_served_as_written_gzipped_and_revalidated(client: TestClient, trained: Path) -> None:
    written = read_map(trained / "vae.pt")
    r = client.get("/models/vae/latent-map")
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["content-encoding"] == "gzip"  # httpx asks for it, and decodes it
    assert r.json() == written
    plain = client.get("/models/vae/latent-map", headers={"accept-encoding": "identity"})
    assert "content-encoding" not in plain.headers and json.loads(plain.content) == written
    assert len(gzip.compress(plain.content)) < len(plain.content) / 2
    assert plain.headers["etag"] == r.headers["etag"] and r.headers["cache-control"] == "no-cache"
    again = client.get("/models/vae/latent-map", headers={"if-none-match": r.headers["etag"]})
    assert again.status_code == 304 and again.content == b""
    assert client.get("/models/vae/latent-map", headers={"if-none-match": '"other"'}).status_code == 200


def test_models_without_a_map_say_why(client: TestClient) -> None:
    r = client.get("/models/deep-tiny/latent-map")
    assert r.status_code == 404 and r.json() == {
        "error": "no latent map", "detail": "model 'deep-tiny' has none: only 2-D models carry one "
                                            "(vae-latent-map adds it)"}
    r = client.get("/models/nope/latent-map")
    assert r.status_code == 404 and r.json()["error"] == "unknown model"
    listed = {m["name"]: m["latent_map"] for m in client.get("/models").json()["models"]}
    assert listed == {"vae": "/models/vae/latent-map", "deep-tiny": None}


def test_the_bundled_2d_model_carries_its_map() -> None:
    from tests.conftest import REPO
    served = load_model(REPO / "models" / "vae-2d.pt", torch.device("cpu"))
    block = json.loads(served.latent_map.body)
    assert block["n"] == 10_000 and all(math.isfinite(v) for v in block["extent"])
    assert load_model(REPO / "models" / "vae.pt", torch.device("cpu")).latent_map is None
