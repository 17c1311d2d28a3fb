"""A client generated from the service's own /openapi.json, as a new user would make one, works.

openapi-python-client reads request and response bodies of the media types it knows
(JSON, application/octet-stream, multipart); `content_type_overrides` tells it that
image/png and image/jpeg are bytes too, as the README says. Every endpoint is called
through the generated code, with each kind of body and answer.
"""

from __future__ import annotations

import base64
import importlib
import io
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.main import create_app
from app.settings import Settings
from tests.conftest import TEST_DATA

pytestmark = pytest.mark.slow
DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
CONFIG = """\
post_hooks: []
project_name_override: vae_client
package_name_override: vae_client
content_type_overrides:
  image/png: application/octet-stream
  image/jpeg: application/octet-stream
"""


@pytest.fixture(scope="module")
def http(models_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as c:
        yield c


@pytest.fixture(scope="module")
def gen(http: TestClient, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    folder = tmp_path_factory.mktemp("generated")
    (folder / "openapi.json").write_text(json.dumps(http.get("/openapi.json").json()))
    (folder / "config.yaml").write_text(CONFIG)
    done = subprocess.run([sys.executable, "-m", "openapi_python_client", "generate", "--path", "openapi.json",
                           "--config", "config.yaml", "--meta", "none", "--output-path", "vae_client"],
                          cwd=folder, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("vae_client")
    finally:
        sys.path.remove(str(folder))
        for name in [m for m in sys.modules if m == "vae_client" or m.startswith("vae_client.")]:
            del sys.modules[name]


@pytest.fixture(scope="module")
def client(gen: ModuleType, http: TestClient):
    c = gen.Client(base_url="http://testserver")
    c.set_httpx_client(http)
    return c


def api(gen: ModuleType, name: str):
    return importlib.import_module(f"vae_client.api.{name}")


def png_size(file) -> tuple[int, int]:
    return Image.open(io.BytesIO(file.payload.read())).size


def test_ops(gen: ModuleType, client) -> None:
    assert api(gen, "ops.healthz").sync(client=client)
    models = api(gen, "ops.models").sync_detailed(client=client)
    assert models.status_code == 200 and json.loads(models.content)["default"] == "vae"


def test_encode_raw_multipart_and_json(gen: ModuleType, client) -> None:
    from vae_client.models import EncodeFilesBody, ImagesIn
    from vae_client.types import File

    encode = api(gen, "model.encode")
    raw = encode.sync(client=client, body=File(payload=io.BytesIO(DIGIT), file_name="7.png", mime_type="image/png"))
    assert raw.model == "vae" and len(raw.mu) == raw.latent_dim == 2
    files = [File(payload=io.BytesIO(DIGIT), file_name=f"{i}.png", mime_type="image/png") for i in range(2)]
    multi = encode.sync(client=client, body=EncodeFilesBody(file=files))
    for row in multi.results:  # batched with another image: equal within the README's batching tolerance
        assert row.mu == pytest.approx(raw.mu, abs=1e-5)
    b64 = encode.sync(client=client, body=ImagesIn(images=[base64.b64encode(DIGIT).decode()]))
    assert b64.mu == raw.mu


def test_image_endpoints_answer_png_by_default_and_json_on_request(gen: ModuleType, client) -> None:
    from vae_client.models import DecodeIn
    from vae_client.types import File

    decode, sample, reconstruct = (api(gen, f"model.{n}") for n in ("decode", "sample", "reconstruct"))
    z = DecodeIn(z=[[0.0, 0.0], [1.0, -1.0]])
    assert png_size(decode.sync(client=client, body=z)) == (62, 32)
    as_json = decode.sync_detailed(client=client, body=z, format_="json")
    assert as_json.status_code == 200 and len(json.loads(as_json.content)["images"]) == 2
    assert png_size(sample.sync(client=client, n=4, seed=1)) == (62, 62)
    drawn = json.loads(sample.sync_detailed(client=client, n=1, seed=1, format_="json").content)
    assert drawn["seed"] == 1 and len(drawn["z"][0]) == 2
    upload = File(payload=io.BytesIO(DIGIT), file_name="7.png", mime_type="image/png")
    assert png_size(reconstruct.sync(client=client, body=upload)) == (62, 32)


def test_anomaly_score_and_a_typed_error(gen: ModuleType, client) -> None:
    from vae_client.models import ErrorOut
    from vae_client.types import File

    score = api(gen, "model.anomaly_score")
    upload = File(payload=io.BytesIO(DIGIT), file_name="7.png", mime_type="image/png")
    answer = score.sync(client=client, body=upload, k=16, seed=3)
    assert answer.k == 16 and answer.score > 0 and 0 <= answer.percentile <= 100
    missing = score.sync(client=client, body=upload, model="nope")
    assert isinstance(missing, ErrorOut) and missing.error == "unknown model"


def test_what_only_a_vae_answers(gen: ModuleType, client) -> None:
    from vae_client.models import InterpolateIn
    from vae_client.types import File

    similar, interpolate, sample = (api(gen, f"model.{n}") for n in ("similar", "interpolate", "sample"))
    upload = File(payload=io.BytesIO(DIGIT), file_name="7.png", mime_type="image/png")
    near = similar.sync(client=client, body=upload, k=3)
    assert near.k == 3 and [n.distance for n in near.neighbours] == sorted(n.distance for n in near.neighbours)
    assert all(0 <= n.label <= 9 and n.index >= 0 for n in near.neighbours)
    strip = interpolate.sync(client=client, body=InterpolateIn(z=[[0.0, 0.0], [1.0, -1.0]]), steps=5)
    assert png_size(strip) == (5 * 30 + 2, 32)
    drawn = json.loads(sample.sync_detailed(client=client, n=2, seed=1, digit=3, format_="json").content)
    assert drawn["seed"] == 1 and len(drawn["z"]) == 2
