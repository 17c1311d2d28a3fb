"""The Open Inference Protocol through clients nobody here wrote, against a real `vae-serve`:
tritonclient[http] (binary tensors by default, and JSON) and kserve's InferenceRESTClient. Their
answers must equal the REST endpoints' for the same images: encode to 1e-6, anomaly scores to
1e-4 for the same seed. docs/api.md's tritonclient block is run as it is written."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig
from kserve.protocol.infer_type import RequestedOutput
from tritonclient.utils import InferenceServerException

from tests.conftest import REPO, free_port, vae_serve
from tests.test_protocol import PIXELS, PNGS

pytestmark = pytest.mark.slow


GRPC_PORT = free_port()


@pytest.fixture(scope="module")
def server(models_dir: Path) -> Iterator[str]:
    with vae_serve({"VAE_MODELS_DIR": str(models_dir), "VAE_GRPC_PORT": str(GRPC_PORT)}) as (base, _):
        yield base


def grpc_client(which: str) -> dict[str, Any]:
    """What tritonclient.grpc or KServe's gRPC client got from the server (tests/grpc_clients.py says why
    in a process of its own)."""
    given = json.dumps({"pixels": PIXELS.tolist(), "pngs": [base64.b64encode(p).decode() for p in PNGS]})
    run = subprocess.run([sys.executable, "-m", "tests.grpc_clients", which, f"127.0.0.1:{GRPC_PORT}"], cwd=REPO,
                         input=given, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def rest(server: str) -> dict[str, Any]:
    """The REST API's answers for the test images: what every client must reproduce."""
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS)]
    encoded = httpx.post(f"{server}/encode", files=files).json()["results"]
    scored = httpx.post(f"{server}/anomaly-score", params={"seed": 3, "k": 16}, files=files).json()
    sampled = httpx.get(f"{server}/sample", params={"n": 4, "seed": 11, "format": "json"}).json()
    return {"mu": np.array([r["mu"] for r in encoded]), "logvar": np.array([r["logvar"] for r in encoded]),
            "score": np.array([r["score"] for r in scored["results"]]),
            "percentile": np.array([r["percentile"] for r in scored["results"]]),
            "is_anomaly": [r["is_anomaly"] for r in scored["results"]], "z": np.array(sampled["z"]),
            "images": np.array(sampled["images"])}


def test_tritonclient_health_metadata_and_errors(server: str) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("vae.encode") and client.is_model_ready("vae.anomaly-score", "1")
    assert not client.is_model_ready("vae.nothing")
    assert client.get_server_metadata() == {"name": "mnist-vae-service", "version": "0.1.0",
                                            "extensions": ["binary_tensor_data"]}
    meta = client.get_model_metadata("vae.encode", "1")
    assert [(t["name"], t["datatype"], t["shape"]) for t in meta["outputs"]] == [
        ("mu", "FP32", [-1, 2]), ("logvar", "FP32", [-1, 2])]
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("vae.nothing")
    assert unknown.value.status() == "404" and "unknown model: 'vae.nothing'" in unknown.value.message()
    wrong = triton.InferInput("images", [1, 28, 28], "UINT8")
    wrong.set_data_from_numpy(PIXELS[:1])
    with pytest.raises(InferenceServerException) as refused:
        client.infer("vae.encode", [wrong])
    assert refused.value.status() == "400" and "input 'images' is FP32, not UINT8" in refused.value.message()


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_infer_equals_rest(server: str, rest: dict[str, Any], binary: bool) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    as_uint8 = triton.InferInput("images_uint8", list(PIXELS.shape), "UINT8")
    as_uint8.set_data_from_numpy(PIXELS, binary_data=binary)
    as_fp32 = triton.InferInput("images", [3, 1, 28, 28], "FP32")
    as_fp32.set_data_from_numpy((PIXELS[:, None] / 255).astype(np.float32), binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("mu", "logvar")]
    for images in (as_uint8, as_fp32):
        result = client.infer("vae.encode", [images], outputs=outputs, request_id="r1")
        assert result.get_response()["id"] == "r1"
        np.testing.assert_allclose(result.as_numpy("mu"), rest["mu"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(result.as_numpy("logvar"), rest["logvar"], atol=1e-6, rtol=0)
    scored = client.infer("vae.anomaly-score", [as_uint8], parameters={"seed": 3, "k": 16},
                          outputs=[triton.InferRequestedOutput(n, binary_data=binary)
                                   for n in ("score", "percentile", "is_anomaly")])
    np.testing.assert_allclose(scored.as_numpy("score"), rest["score"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(scored.as_numpy("percentile"), rest["percentile"], atol=1e-4, rtol=0)
    assert scored.as_numpy("is_anomaly").tolist() == rest["is_anomaly"]
    n = triton.InferInput("n", [1], "INT32")
    n.set_data_from_numpy(np.array([4], np.int32), binary_data=binary)
    drawn = client.infer("vae.sample", [n], parameters={"seed": 11})
    np.testing.assert_allclose(drawn.as_numpy("z"), rest["z"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(drawn.as_numpy("images")[:, 0], rest["images"], atol=1e-5, rtol=0)
    z = triton.InferInput("z", [4, 2], "FP32")
    z.set_data_from_numpy(drawn.as_numpy("z"), binary_data=binary)
    decoded = client.infer("vae.decode", [z]).as_numpy("images")
    np.testing.assert_allclose(decoded, drawn.as_numpy("images"), atol=1e-6, rtol=0)


def test_tritonclient_sends_image_files_as_bytes(server: str, rest: dict[str, Any]) -> None:
    client = triton.InferenceServerClient(server.removeprefix("http://"))
    files = triton.InferInput("image_files", [len(PNGS)], "BYTES")
    files.set_data_from_numpy(np.array(PNGS, dtype=np.object_))
    result = client.infer("vae.reconstruct", [files])
    assert result.as_numpy("reconstructions").shape == (3, 1, 28, 28)
    np.testing.assert_allclose(client.infer("vae.encode", [files]).as_numpy("mu"), rest["mu"], atol=1e-6, rtol=0)


def test_kserve_rest_client_v2(server: str, rest: dict[str, Any]) -> None:
    async def main() -> None:
        async with InferenceRESTClient(RESTConfig(protocol="v2", retries=0)) as client:
            assert await client.is_server_live(server) and await client.is_server_ready(server)
            assert await client.is_model_ready(server, "vae.encode")
            assert not await client.is_model_ready(server, "vae.nothing")
            for binary in (True, False):
                images = InferInput("images_uint8", list(PIXELS.shape), "UINT8")
                images.set_data_from_numpy(PIXELS, binary_data=binary)
                request = InferRequest("vae.encode", [images], request_id="k1")
                result = await client.infer(server, request, model_name="vae.encode")
                assert result.id == "k1" and result.model_name == "vae.encode"
                by_name = {o.name: o.as_numpy() for o in result.outputs}
                np.testing.assert_allclose(by_name["mu"], rest["mu"], atol=1e-6, rtol=0)
                np.testing.assert_allclose(by_name["logvar"], rest["logvar"], atol=1e-6, rtol=0)
                request = InferRequest("vae.anomaly-score", [images], parameters={"seed": 3, "k": 16},
                                       request_outputs=[RequestedOutput("score", {"binary_data": binary})])
                scored = await client.infer(server, request, model_name="vae.anomaly-score")
                assert [o.name for o in scored.outputs] == ["score"]
                np.testing.assert_allclose(scored.outputs[0].as_numpy(), rest["score"], atol=1e-4, rtol=0)
            with pytest.raises(httpx.HTTPStatusError, match=re.escape("unknown model: 'nope.encode'")):
                await client.infer(server, InferRequest("nope.encode", [images]), model_name="nope.encode")

    asyncio.run(main())


def test_the_docs_tritonclient_block_runs_as_written(server: str, rest: dict[str, Any], monkeypatch) -> None:
    """docs/api.md's block, against the tiny test model (what it prints on the bundled models is checked by
    scripts/readme_examples.py)."""
    page = (REPO / "docs" / "api.md").read_text()
    block = re.search(r"<!-- tritonclient:start -->\n```python\n(.*?)```\n<!-- tritonclient:end -->", page, re.S)
    assert block, "docs/api.md lost its tritonclient block"
    code = block.group(1).replace('"localhost:8000"', repr(server.removeprefix("http://")))
    monkeypatch.chdir(REPO)
    printed = io.StringIO()
    namespace: dict[str, Any] = {}
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "docs/api.md (tritonclient block)", "exec"), namespace)
    assert printed.getvalue().startswith("(1, 2) [")  # the tiny test model's latent_dim is 2
    seven = httpx.post(f"{server}/encode", content=(REPO / "tests/data/mnist_test_0_digit_7.png").read_bytes(),
                       headers={"content-type": "image/png"}).json()
    np.testing.assert_allclose(namespace["mu"][0], seven["mu"], atol=1e-6, rtol=0)
    assert namespace["scored"].as_numpy("score")[0] == pytest.approx(
        httpx.post(f"{server}/anomaly-score", content=(REPO / "tests/data/mnist_test_0_digit_7.png").read_bytes(),
                   headers={"content-type": "image/png"}).json()["score"], abs=1e-4)


def test_tritonclient_grpc_answers_equal_rest(server: str, rest: dict[str, Any]) -> None:
    got = grpc_client("triton")
    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, [True, True])
    assert got["server"] == {"name": "mnist-vae-service", "version": "0.1.0", "extensions": ["binary_tensor_data"]}
    assert [(t["name"], t["datatype"], t["shape"]) for t in got["metadata"]["outputs"]] == [
        ("mu", "FP32", ["-1", "2"]), ("logvar", "FP32", ["-1", "2"])]
    assert got["metadata"]["versions"] == ["1"]
    assert (got["encode"]["id"], got["encode"]["version"]) == ("t1", "1")
    for mu in (got["encode"]["mu"], got["encode_fp32"], got["encode_files"]):
        np.testing.assert_allclose(mu, rest["mu"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["encode"]["logvar"], rest["logvar"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["score"]["score"], rest["score"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(got["score"]["percentile"], rest["percentile"], atol=1e-4, rtol=0)
    assert got["score"]["is_anomaly"] == rest["is_anomaly"]
    np.testing.assert_allclose(got["sample"]["z"], rest["z"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.array(got["sample"]["images"])[:, 0], rest["images"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["decode"], got["sample"]["images"], atol=1e-6, rtol=0)
    errors = got["errors"]
    assert errors["unknown_model"][0] == "StatusCode.NOT_FOUND"
    assert errors["unknown_model"][1].startswith("unknown model: 'nope.encode'; served: deep-tiny.encode, ")
    assert errors["wrong_datatype"] == ["StatusCode.INVALID_ARGUMENT", "invalid request: input 'images' is FP32, "
                                        "not UINT8; give " + errors["wrong_datatype"][1].split("; give ")[1]]
    assert errors["unknown_version"] == ["StatusCode.NOT_FOUND", "unknown model: 'vae.encode' has no version '9'; "
                                         "served: 1"]
    assert errors["load_missing"][0] == "StatusCode.NOT_FOUND"
    assert {(m["name"], m["version"], m["state"]) for m in got["index"]} == {("vae", "1", "READY"),
                                                                             ("deep-tiny", "1", "READY")}
    ready, index = got["after_unload"]
    assert not ready
    assert {"name": "deep-tiny", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
    assert got["after_load"] is True


def test_kserve_grpc_client_answers_equal_rest(server: str, rest: dict[str, Any]) -> None:
    got = grpc_client("kserve")
    assert (got["live"], got["ready"], got["model_ready"]) == (True, True, True)
    for form in ("encode_raw", "encode_typed"):
        assert got[form]["id"] == "k1"
        np.testing.assert_allclose(got[form]["mu"], rest["mu"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(got[form]["logvar"], rest["logvar"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(got["score"]["score"], rest["score"], atol=1e-4, rtol=0)
    assert got["score"]["is_anomaly"] == rest["is_anomaly"]


def test_the_readme_client_block_runs_as_written(server: str) -> None:
    """README's tritonclient block, over HTTP and gRPC, in a process of its own (tritonclient.grpc cannot share
    one with kserve): both print the same latent mean, the REST /encode's."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- clients:start -->\n```python\n(.*?)```\n<!-- clients:end -->", readme, re.S)
    assert block, "README.md lost its clients block"
    code = block.group(1).replace('"localhost:8000"', repr(server.removeprefix("http://"))).replace(
        '"localhost:8081"', repr(f"127.0.0.1:{GRPC_PORT}"))
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["tritonclient.http", "tritonclient.grpc"]
    seven = httpx.post(f"{server}/encode", content=(REPO / "tests/data/mnist_test_0_digit_7.png").read_bytes(),
                       headers={"content-type": "image/png"}).json()
    for line in lines:
        printed = np.array(line.split("[", 1)[1].rstrip("]").split(), dtype=np.float32)
        np.testing.assert_allclose(printed, seven["mu"][:2], atol=1e-5, rtol=0)
