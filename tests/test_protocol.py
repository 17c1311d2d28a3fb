"""The Open Inference Protocol v2 on the real app with the tiny artifacts: every protocol model
answers what the REST endpoint answers for the same images, in every tensor encoding; each
malformed request gets a 400 (or 404) that says what is wrong."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.exceptions import InvalidInput
from app.main import create_app
from app.middleware import HttpLimits, ServiceMiddleware
from app.protocol import codec
from tests.conftest import TEST_DATA
from tests.test_api import settings
from tests.test_limits import held_app

PNGS = [p.read_bytes() for p in sorted(TEST_DATA.glob("mnist_test_*.png"))[:3]]
PIXELS = np.stack([np.asarray(Image.open(io.BytesIO(b))) for b in PNGS])  # uint8 [3, 28, 28]
INFER = "/v2/models/{}/infer"


@pytest.fixture(scope="module")
def client(models_dir: Path) -> Iterator[TestClient]:
    app = create_app(settings(models_dir, max_batch=8, max_samples=64, max_k=256))
    with TestClient(app) as c:
        yield c


def binary_request(inputs: list[tuple[str, str, np.ndarray | list[bytes]]], **extra: Any) -> tuple[bytes, dict]:
    """A binary-extension request as tritonclient builds one: the JSON document, then each tensor's bytes."""
    docs, blobs = [], []
    for name, datatype, value in inputs:
        if datatype == "BYTES":
            blob = b"".join(struct.pack("<I", len(v)) + v for v in value)
            shape = [len(value)]
        else:
            blob, shape = value.astype(codec.NUMERIC[datatype]).tobytes(), list(value.shape)
        docs.append({"name": name, "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    header = json.dumps({"inputs": docs, **extra}).encode()
    return header + b"".join(blobs), {"Inference-Header-Content-Length": str(len(header))}


def outputs_of(r: httpx.Response) -> dict[str, np.ndarray]:
    """Each output as an array, whether it came as JSON or binary."""
    assert r.status_code == 200, r.text
    n = int(r.headers.get("inference-header-content-length", len(r.content)))
    doc, rest = json.loads(r.content[:n]), r.content[n:]
    out, offset = {}, 0
    for o in doc["outputs"]:
        dtype = codec.NUMERIC[o["datatype"]]
        if "data" in o:
            out[o["name"]] = np.asarray(o["data"], dtype).reshape(o["shape"])
        else:
            size = o["parameters"]["binary_data_size"]
            out[o["name"]] = np.frombuffer(rest[offset:offset + size], dtype).reshape(o["shape"])
            offset += size
    assert offset == len(rest)
    return out


def rest_encode(client: TestClient) -> tuple[np.ndarray, np.ndarray]:
    r = client.post("/encode", files=[("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS)])
    results = r.json()["results"]
    return np.array([x["mu"] for x in results]), np.array([x["logvar"] for x in results])


def test_server_metadata_and_health(client: TestClient) -> None:
    assert client.get("/v2").json() == {"name": "mnist-vae-service", "version": "0.1.0",
                                        "extensions": ["binary_tensor_data"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    ready = client.get("/v2/health/ready")
    assert ready.status_code == 200 and ready.json() == {"ready": True}


def test_model_metadata_says_exactly_what_goes_in_and_out(client: TestClient) -> None:
    images = [{"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]},
              {"name": "images_uint8", "datatype": "UINT8", "shape": [-1, 28, 28]},
              {"name": "image_files", "datatype": "BYTES", "shape": [-1]}]
    picture = {"name": "images", "datatype": "FP32", "shape": [-1, 1, 28, 28]}
    expected = {  # the tiny "vae" has latent_dim 2, "deep-tiny" 8
        "vae.encode": (images, [{"name": "mu", "datatype": "FP32", "shape": [-1, 2]},
                                {"name": "logvar", "datatype": "FP32", "shape": [-1, 2]}]),
        "vae.decode": ([{"name": "z", "datatype": "FP32", "shape": [-1, 2]}], [picture]),
        "deep-tiny.decode": ([{"name": "z", "datatype": "FP32", "shape": [-1, 8]}], [picture]),
        "vae.sample": ([{"name": "n", "datatype": "INT32", "shape": [1]},
                        {"name": "seed", "datatype": "INT64", "shape": [1]},
                        {"name": "temperature", "datatype": "FP32", "shape": [1]},
                        {"name": "digit", "datatype": "INT32", "shape": [1]}],
                       [picture, {"name": "z", "datatype": "FP32", "shape": [-1, 2]},
                        {"name": "seed", "datatype": "INT64", "shape": [1]}]),
        "vae.reconstruct": (images, [{"name": "reconstructions", "datatype": "FP32", "shape": [-1, 1, 28, 28]}]),
        "vae.anomaly-score": (images, [{"name": "score", "datatype": "FP64", "shape": [-1]},
                                       {"name": "percentile", "datatype": "FP64", "shape": [-1]},
                                       {"name": "is_anomaly", "datatype": "BOOL", "shape": [-1]}]),
        "vae.similar": (images, [{"name": "index", "datatype": "INT64", "shape": [-1, -1]},
                                 {"name": "label", "datatype": "INT32", "shape": [-1, -1]},
                                 {"name": "distance", "datatype": "FP32", "shape": [-1, -1]}]),
    }
    for name, (inputs, outputs) in expected.items():
        meta = client.get(f"/v2/models/{name}").json()
        assert {k: meta[k] for k in ("name", "versions", "platform", "inputs", "outputs")} == {
            "name": name, "versions": ["1"], "platform": "pytorch_torchscript", "inputs": inputs, "outputs": outputs}
        assert client.get(f"/v2/models/{name}/versions/1").json() == meta


def test_model_ready_and_unknown_models_and_versions(client: TestClient) -> None:
    assert client.get("/v2/models/vae.encode/ready").json() == {"name": "vae.encode", "ready": True}
    assert client.get("/v2/models/deep-tiny.anomaly-score/versions/1/ready").status_code == 200
    for path in ("/v2/models/vae/ready", "/v2/models/nope.encode", "/v2/models/vae.encode/versions/2/ready",
                 "/v2/models/vae.explain/infer"):
        r = client.request("POST" if path.endswith("infer") else "GET", path, json={"inputs": []})
        assert r.status_code == 404, path
        assert r.json()["error"].startswith("unknown model: ")
    listed = client.get("/v2/models/vae").json()["error"]
    assert "served: deep-tiny.encode, deep-tiny.decode" in listed and "vae.anomaly-score" in listed
    assert client.get("/v2/models/vae.encode/versions/2").json() == {
        "error": "unknown model: 'vae.encode' has no version '2'; served: 1"}


def test_encode_equals_rest_in_every_image_form_and_encoding(client: TestClient) -> None:
    mu, logvar = rest_encode(client)
    floats = PIXELS.astype(np.float32) / 255
    b64 = [base64.b64encode(b).decode() for b in PNGS]
    binary = {
        "uint8": binary_request([("images_uint8", "UINT8", PIXELS)]),
        "fp32 [n,1,28,28]": binary_request([("images", "FP32", floats[:, None])]),
        "files": binary_request([("image_files", "BYTES", PNGS)]),
    }
    json_bodies = {
        "uint8 nested": {"inputs": [{"name": "images_uint8", "datatype": "UINT8", "shape": [3, 28, 28],
                                     "data": PIXELS.tolist()}]},
        "fp32 flat [n,28,28]": {"inputs": [{"name": "images", "datatype": "FP32", "shape": [3, 28, 28],
                                            "data": floats.reshape(-1).tolist()}]},
        "files base64": {"inputs": [{"name": "image_files", "datatype": "BYTES", "shape": [3], "data": b64}]},
    }
    answers = {k: client.post(INFER.format("vae.encode"), content=b, headers=h) for k, (b, h) in binary.items()}
    answers |= {k: client.post(INFER.format("vae.encode"), json=j) for k, j in json_bodies.items()}
    for form, r in answers.items():
        out = outputs_of(r)
        assert list(out) == ["mu", "logvar"], form
        np.testing.assert_allclose(out["mu"], mu, atol=1e-6, rtol=0, err_msg=form)
        np.testing.assert_allclose(out["logvar"], logvar, atol=1e-6, rtol=0, err_msg=form)
        assert r.headers["content-type"] == "application/json"  # no binary output asked for


def test_outputs_are_binary_when_asked_in_the_order_asked(client: TestClient) -> None:
    body, headers = binary_request([("images_uint8", "UINT8", PIXELS[:1])], outputs=[
        {"name": "logvar", "parameters": {"binary_data": True}}, {"name": "mu"}])
    r = client.post(INFER.format("vae.encode"), content=body, headers=headers)
    n = int(r.headers["inference-header-content-length"])
    doc = json.loads(r.content[:n])
    assert r.headers["content-type"] == "application/octet-stream"
    assert [o["name"] for o in doc["outputs"]] == ["logvar", "mu"]
    assert doc["outputs"][0] == {"name": "logvar", "datatype": "FP32", "shape": [1, 2],
                                 "parameters": {"binary_data_size": 8}}
    assert len(r.content) == n + 8 and len(doc["outputs"][1]["data"]) == 2
    everything = json.loads(body[:int(headers["Inference-Header-Content-Length"])])
    everything.pop("outputs")
    everything["parameters"] = {"binary_data_output": True}
    header = json.dumps(everything).encode()
    r = client.post(INFER.format("vae.encode"), content=header + PIXELS[:1].tobytes(),
                    headers={"Inference-Header-Content-Length": str(len(header))})
    doc = json.loads(r.content[:int(r.headers["inference-header-content-length"])])
    assert [o.get("parameters") for o in doc["outputs"]] == [{"binary_data_size": 8}] * 2
    only = client.post(INFER.format("vae.encode"), json={**json_pixels(PIXELS[:1]), "outputs": [{"name": "mu"}]})
    assert [o["name"] for o in only.json()["outputs"]] == ["mu"]


def json_pixels(pixels: np.ndarray) -> dict[str, Any]:
    return {"inputs": [{"name": "images_uint8", "datatype": "UINT8", "shape": list(pixels.shape),
                        "data": pixels.reshape(-1).tolist()}]}


def test_request_id_is_echoed_and_the_model_version_named(client: TestClient) -> None:
    r = client.post(INFER.format("vae.encode"), json={"id": "req-42", **json_pixels(PIXELS[:1])},
                    headers={"X-Request-ID": "trace-7"})
    assert r.headers["x-request-id"] == "trace-7"
    doc = r.json()
    assert (doc["id"], doc["model_name"], doc["model_version"]) == ("req-42", "vae.encode", "1")
    assert "id" not in client.post(INFER.format("vae.encode"), json=json_pixels(PIXELS[:1])).json()


@pytest.mark.parametrize("model", ["vae", "deep-tiny"])
def test_anomaly_score_equals_rest_for_the_same_seed(client: TestClient, model: str) -> None:
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS)]
    for method in (None, "bound"):
        query = {"model": model, "seed": 5, "k": 16, "threshold_percentile": 90} | ({"method": method} if method
                                                                                    else {})
        rest = client.post("/anomaly-score", params=query, files=files).json()
        params = {k: v for k, v in query.items() if k != "model"}
        body, headers = binary_request([("images_uint8", "UINT8", PIXELS)], parameters=params)
        r = client.post(INFER.format(f"{model}.anomaly-score"), content=body, headers=headers)
        out = outputs_of(r)
        results = rest["results"]
        np.testing.assert_allclose(out["score"], [x["score"] for x in results], atol=1e-4, rtol=0)
        np.testing.assert_allclose(out["percentile"], [x["percentile"] for x in results], atol=1e-4, rtol=0)
        assert out["is_anomaly"].tolist() == [x["is_anomaly"] for x in results]
        assert out["score"].dtype == np.float64 and out["is_anomaly"].dtype == np.bool_
        assert r.json()["parameters"] == {k: rest[k] for k in ("method", "k", "threshold", "threshold_percentile",
                                                                "calibration_k")}


def test_sample_equals_rest_from_parameters_or_inputs(client: TestClient) -> None:
    rest = client.get("/sample", params={"n": 3, "seed": 7, "temperature": 0.5, "format": "json"}).json()
    by_params = client.post(INFER.format("vae.sample"), json={"inputs": [], "parameters": {
        "n": 3, "seed": 7, "temperature": 0.5}})
    body, headers = binary_request([("n", "INT32", np.array([3])), ("seed", "INT64", np.array([7])),
                                    ("temperature", "FP32", np.array([0.5]))])
    by_inputs = client.post(INFER.format("vae.sample"), content=body, headers=headers)
    for r in (by_params, by_inputs):
        out = outputs_of(r)
        assert out["seed"].tolist() == [7] and out["images"].shape == (3, 1, 28, 28)
        np.testing.assert_allclose(out["z"], rest["z"], atol=1e-6, rtol=0)
        np.testing.assert_allclose(out["images"][:, 0], rest["images"], atol=1e-5, rtol=0)  # REST rounds to 1e-5
    drawn = outputs_of(client.post(INFER.format("vae.sample"), json={"inputs": []}))
    assert drawn["images"].shape == (16, 1, 28, 28) and drawn["seed"].shape == (1,)  # REST's defaults: n=16, any seed


def test_decode_and_reconstruct_equal_rest(client: TestClient) -> None:
    z = [[0.5, -1.0], [2.0, 0.25]]
    rest = client.post("/decode?format=json", json={"z": z}).json()
    out = outputs_of(client.post(INFER.format("vae.decode"), json={"inputs": [
        {"name": "z", "datatype": "FP32", "shape": [2, 2], "data": z}]}))
    np.testing.assert_allclose(out["images"][:, 0], rest["images"], atol=1e-5, rtol=0)
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS)]
    rest = client.post("/reconstruct?format=json", files=files).json()
    out = outputs_of(client.post(INFER.format("vae.reconstruct"), json=json_pixels(PIXELS)))
    np.testing.assert_allclose(out["reconstructions"][:, 0], rest["images"], atol=1e-5, rtol=0)


def test_image_files_are_preprocessed_as_rest_with_the_same_options(client: TestClient) -> None:
    """A photo of a dark digit on paper: the same invert/fit options, the same latent (or the same refusal)."""
    photo = (TEST_DATA / "photo_dark_on_light_digit_4.jpg").read_bytes()
    for options in ({}, {"invert": "false", "fit": "false"}):
        rest = client.post("/encode", params=options, content=photo, headers={"content-type": "image/jpeg"})
        params = {k: v == "true" if k == "invert" or k == "fit" else v for k, v in options.items()}  # JSON booleans
        body, headers = binary_request([("image_files", "BYTES", [photo])], parameters=params)
        r = client.post(INFER.format("vae.encode"), content=body, headers=headers)
        if rest.status_code != 200:  # fit=false on a photo that is not 28x28: refused by both
            assert r.status_code == 400 and rest.json()["detail"] in r.json()["error"]
            continue
        np.testing.assert_allclose(outputs_of(r)["mu"][0], rest.json()["mu"], atol=1e-6, rtol=0)


def post_binary(client: TestClient, model: str, inputs: list, **extra: Any) -> httpx.Response:
    body, headers = binary_request(inputs, **extra)
    return client.post(INFER.format(model), content=body, headers=headers)


U8 = PIXELS[:1]


@pytest.mark.parametrize(("case", "send", "error"), [
    ("not JSON", lambda c: c.post(INFER.format("vae.encode"), content=b"\x00\x01binary"),
     "malformed JSON: the inference request is not a JSON document (binary tensors need the "
     "Inference-Header-Content-Length header)"),
    ("header length past the body", lambda c: c.post(INFER.format("vae.encode"), content=b"{}",
                                                     headers={"Inference-Header-Content-Length": "3"}),
     "malformed request: Inference-Header-Content-Length '3' is not a length within the 2-byte body"),
    ("no inputs field", lambda c: c.post(INFER.format("vae.encode"), json={}),
     "invalid request: inputs: Field required"),
    ("neither data nor binary", lambda c: c.post(INFER.format("vae.encode"), json={"inputs": [
        {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28]}]}),
     "invalid request: input 'images' has neither 'data' nor parameters.binary_data_size"),
    ("wrong element count", lambda c: c.post(INFER.format("vae.encode"), json={"inputs": [
        {"name": "images", "datatype": "FP32", "shape": [1, 1, 28, 28], "data": [0.5] * 783}]}),
     "invalid request: input 'images': shape [1, 1, 28, 28] needs 784 values; 'data' holds 783"),
    ("ragged data", lambda c: c.post(INFER.format("vae.decode"), json={"inputs": [
        {"name": "z", "datatype": "FP32", "shape": [2, 2], "data": [[0, 0], [0]]}]}), "is not a regular array"),
    ("strings as numbers", lambda c: c.post(INFER.format("vae.decode"), json={"inputs": [
        {"name": "z", "datatype": "FP32", "shape": [1, 2], "data": ["0.5", "1"]}]}),
     "invalid request: input 'z': 'data' must hold numbers (or booleans for BOOL)"),
    ("uint8 out of range", lambda c: c.post(INFER.format("vae.encode"), json={"inputs": [
        {"name": "images_uint8", "datatype": "UINT8", "shape": [1, 28, 28], "data": [300] + [0] * 783}]}),
     "invalid request: input 'images_uint8': a value in 'data' is not representable as UINT8"),
    ("unknown datatype", lambda c: c.post(INFER.format("vae.encode"), json={"inputs": [
        {"name": "images", "datatype": "FLOAT", "shape": [1], "data": [0]}]}),
     "invalid request: input 'images': datatype 'FLOAT' is none of BOOL, UINT8, UINT16"),
    ("images of the wrong shape", lambda c: post_binary(c, "vae.encode", [
        ("images_uint8", "UINT8", np.zeros((1, 28, 27), np.uint8))]), "it takes [n,1,28,28] or [n,28,28]"),
    ("binary size past the body", lambda c: c.post(INFER.format("vae.encode"), content=(h := json.dumps({"inputs": [
        {"name": "images_uint8", "datatype": "UINT8", "shape": [1, 28, 28], "parameters": {"binary_data_size": 784}}
    ]}).encode()) + bytes(10), headers={"Inference-Header-Content-Length": str(len(h))}),
     "invalid request: input 'images_uint8': binary_data_size 784 is more than the 10 bytes of binary data left"),
    ("bytes left over", lambda c: c.post(INFER.format("vae.encode"), content=(h := json.dumps({"inputs": [
        {"name": "images_uint8", "datatype": "UINT8", "shape": [1, 28, 28], "parameters": {"binary_data_size": 784}}
    ]}).encode()) + bytes(790), headers={"Inference-Header-Content-Length": str(len(h))}),
     "invalid request: 6 bytes of binary data after the last binary input"),
    ("wrong datatype for the name", lambda c: post_binary(c, "vae.encode", [("images", "UINT8", U8)]),
     "invalid request: input 'images' is FP32, not UINT8; give exactly one of: images (FP32"),
    ("two image inputs", lambda c: post_binary(c, "vae.encode", [("images_uint8", "UINT8", U8),
                                                                  ("images", "FP32", U8 / 255)]),
     "invalid request: give exactly one of: images (FP32 [n,1,28,28] in [0, 1]), images_uint8 (UINT8 [n,28,28]) "
     "or image_files (BYTES [n], encoded image files); got 2 inputs"),
    ("unknown input", lambda c: post_binary(c, "vae.encode", [("pixels", "UINT8", U8)]),
     "invalid request: unknown input 'pixels'; this model takes images, images_uint8, image_files"),
    ("unknown output", lambda c: post_binary(c, "vae.encode", [("images_uint8", "UINT8", U8)],
                                             outputs=[{"name": "sigma"}]),
     "invalid request: output 'sigma': model 'vae.encode' has outputs mu, logvar"),
    ("pixels above 1", lambda c: post_binary(c, "vae.encode", [("images", "FP32", U8.astype(np.float32))]),
     "invalid request: input 'images' must hold pixels in [0, 1] (white digit on black)"),
    ("no images", lambda c: post_binary(c, "vae.encode", [("images_uint8", "UINT8", U8[:0])]),
     "invalid request: input 'images_uint8' holds no images"),
    ("batch over the limit", lambda c: post_binary(c, "vae.encode", [("images_uint8", "UINT8", np.zeros(
        (9, 28, 28), np.uint8))]), "batch too large: 9 images; the limit is 8 (VAE_MAX_BATCH)"),
    ("cut BYTES element", lambda c: c.post(INFER.format("vae.encode"), content=(h := json.dumps({"inputs": [
        {"name": "image_files", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 8}}
    ]}).encode()) + struct.pack("<I", 100) + b"abcd", headers={"Inference-Header-Content-Length": str(len(h))}),
     "invalid request: input 'image_files': BYTES element 0 says 100 bytes; 4 are left"),
    ("BYTES count off", lambda c: c.post(INFER.format("vae.encode"), content=(h := json.dumps({"inputs": [
        {"name": "image_files", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 5}}
    ]}).encode()) + struct.pack("<I", 1) + b"a", headers={"Inference-Header-Content-Length": str(len(h))}),
     "invalid request: input 'image_files': shape says 2 BYTES elements; the data holds 1"),
    ("JSON file not base64", lambda c: c.post(INFER.format("vae.encode"), json={"inputs": [
        {"name": "image_files", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}),
     "invalid request: image_files[0]: a JSON BYTES element must be the file in base64"),
    ("not an image", lambda c: post_binary(c, "vae.encode", [("image_files", "BYTES", [b"hello"])]),
     "cannot decode image: 5 bytes in no image format Pillow reads"),
    ("wrong latent size", lambda c: post_binary(c, "vae.decode", [("z", "FP32", np.zeros((1, 3)))]),
     "wrong latent size: z has shape [1, 3]; model 'vae' takes [n, 2]"),
    ("NaN latent", lambda c: post_binary(c, "vae.decode", [("z", "FP32", np.array([[np.nan, 0.0]]))]),
     "invalid request: input 'z' must hold finite values within ±10000"),
    ("z as FP64", lambda c: post_binary(c, "vae.decode", [("z", "FP64", np.zeros((1, 2)))]),
     "invalid request: give one input 'z', FP32 [n,2]"),
    ("k out of range", lambda c: post_binary(c, "vae.anomaly-score", [("images_uint8", "UINT8", U8)],
                                             parameters={"k": 0}),
     "invalid request: parameters.k: Input should be greater than or equal to 1"),
    ("k over the limit", lambda c: post_binary(c, "vae.anomaly-score", [("images_uint8", "UINT8", U8)],
                                               parameters={"k": 257}),
     "k too large: k=257; the limit is 256 (VAE_MAX_K)"),
    ("unknown score method", lambda c: post_binary(c, "deep-tiny.anomaly-score", [("images_uint8", "UINT8", U8)],
                                                   parameters={"method": "fisher"}),
     "unknown score method: 'fisher'; model 'deep-tiny' serves ['bound']"),
    ("n over the limit", lambda c: c.post(INFER.format("vae.sample"), json={"inputs": [], "parameters": {"n": 65}}),
     "too many samples: n=65; the limit is 64 (VAE_MAX_SAMPLES)"),
    ("n with two elements", lambda c: post_binary(c, "vae.sample", [("n", "INT32", np.array([1, 2]))]),
     "invalid request: input 'n' must hold one number"),
])
def test_bad_requests_get_400_saying_what_is_wrong(client: TestClient, case: str, send, error: str) -> None:
    r = send(client)
    assert r.status_code == 400, (case, r.text)
    assert list(r.json()) == ["error"] and error in r.json()["error"], case


def test_protocol_errors_keep_the_body_limit_overload_and_timeout_statuses(models_dir: Path) -> None:
    with TestClient(create_app(settings(models_dir, max_body_bytes=1000, request_timeout_s=1e-9))) as c:
        big = c.post(INFER.format("vae.encode"), content=bytes(2000))
        assert big.status_code == 413 and big.json() == {
            "error": "request body too large: 2000 bytes; the limit is 1000 (VAE_MAX_BODY_BYTES)"}
        slow = post_binary(c, "vae.anomaly-score", [("images_uint8", "UINT8", U8)], parameters={"k": 256})
        assert slow.status_code == 504 and slow.json() == {
            "error": "compute timeout: no result within 1e-09 s (VAE_REQUEST_TIMEOUT_S)"}
        assert c.get("/v2/nothing").json() == {"error": "Not Found"}


def test_overload_gets_503_in_protocol_shape_and_protocol_probes_are_never_refused() -> None:
    release = asyncio.Event()
    app = ServiceMiddleware(held_app(release), HttpLimits(max_body_bytes=1000, max_in_flight=1))

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            held = asyncio.create_task(client.post(INFER.format("vae.encode")))
            await asyncio.sleep(0.05)
            refused = await asyncio.wait_for(client.post(INFER.format("vae.encode")), 1.0)
            probes = [asyncio.create_task(client.get(p)) for p in ("/v2/health/ready", "/v2/models/vae.encode/ready")]
            await asyncio.sleep(0.05)
            release.set()
            return [await held, refused, *[await p for p in probes]]

    held, refused, *probes = asyncio.run(main())
    assert held.status_code == 200 and [p.status_code for p in probes] == [200, 200]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
    assert refused.json() == {"error": "overloaded: 1 requests in progress; the limit is 1 (VAE_MAX_IN_FLIGHT)"}


def test_not_ready_until_the_models_are_loaded(models_dir: Path) -> None:
    app = create_app(settings(models_dir))
    with TestClient(app) as c:  # the lifespan has run: ready; then pretend it has not
        app.state.ready = False
        try:
            assert c.get("/v2/health/ready").status_code == 503 and c.get("/v2/health/ready").json() == {
                "ready": False}
            assert c.get("/v2/health/live").status_code == 200
            r = c.get("/v2/models/vae.encode/ready")
            assert r.status_code == 503 and r.json() == {"error": "not ready: models are still loading"}
        finally:
            app.state.ready = True


def test_protocol_requests_share_the_engines_batching_and_metrics(client: TestClient) -> None:
    before = {m["name"]: m["batching"] for m in client.get("/models").json()["models"]}["vae"]
    client.post(INFER.format("vae.encode"), json=json_pixels(PIXELS[:1]))
    after = {m["name"]: m["batching"] for m in client.get("/models").json()["models"]}["vae"]
    assert after["encode"]["requests"] == before.get("encode", {"requests": 0})["requests"] + 1
    metrics = client.get("/metrics").text
    assert 'vae_requests_total{endpoint="/v2/models/{model_name}/infer",model="vae.encode",status="200"}' in metrics


# --- the codec on its own ---------------------------------------------------------------------


def test_bytes_elements_split_on_their_length_prefixes() -> None:
    body = json.dumps({"inputs": [{"name": "s", "datatype": "BYTES", "shape": [3],
                                   "parameters": {"binary_data_size": 4 + 0 + 4 + 3 + 4 + 1}}]}).encode()
    n = len(body)
    _, [t] = codec.read_request(body + b"\0\0\0\0" + b"\3\0\0\0abc" + b"\1\0\0\0z", str(n), 10_000)
    assert t.elements == [b"", b"abc", b"z"] and t.shape == (3,)


def test_json_data_nested_or_flat_gives_the_same_tensor() -> None:
    nested = {"inputs": [{"name": "x", "datatype": "INT16", "shape": [2, 3], "data": [[1, 2, 3], [4, 5, -6]]}]}
    flat = {"inputs": [{"name": "x", "datatype": "INT16", "shape": [2, 3], "data": [1, 2, 3, 4, 5, -6]}]}
    [a], [b] = (codec.read_request(json.dumps(d).encode(), None, 10_000)[1] for d in (nested, flat))
    assert a.array.dtype == b.array.dtype == np.int16
    assert a.array.tolist() == b.array.tolist() == [[1, 2, 3], [4, 5, -6]]
    with pytest.raises(InvalidInput) as refused:
        codec.read_request(json.dumps({"inputs": [{"name": "x", "datatype": "INT16", "shape": [1],
                                                   "data": [1.5]}]}).encode(), None, 10_000)
    assert refused.value.detail == "input 'x': a value in 'data' is not representable as INT16"


def test_binary_numbers_are_little_endian_row_major() -> None:
    header = json.dumps({"inputs": [{"name": "x", "datatype": "FP64", "shape": [2],
                                     "parameters": {"binary_data_size": 16}}]}).encode()
    _, [t] = codec.read_request(header + struct.pack("<dd", 1.5, -2.0), str(len(header)), 10_000)
    assert t.array.tolist() == [1.5, -2.0]


def test_response_puts_binary_outputs_after_the_document_in_order() -> None:
    request = codec.InferenceRequest.model_validate({"id": "7", "inputs": [], "parameters": {
        "binary_data_output": True}, "outputs": [{"name": "b"}, {"name": "a", "parameters": {"binary_data": False}}]})
    outputs = [codec.Output("a", "INT32", np.array([1, 2], np.int32)), codec.Output("b", "BOOL", np.array([True]))]
    body, n = codec.write_response("m", "1", request, outputs, {"k": 3})
    assert n is not None and json.loads(body[:n]) == {
        "model_name": "m", "model_version": "1", "id": "7", "parameters": {"k": 3}, "outputs": [
            {"name": "b", "datatype": "BOOL", "shape": [1], "parameters": {"binary_data_size": 1}},
            {"name": "a", "datatype": "INT32", "shape": [2], "data": [1, 2]}]}
    assert body[n:] == b"\x01"


@pytest.mark.parametrize("order", [["mu", "logvar"], ["logvar", "mu"]])
def test_binary_outputs_carry_each_tensors_own_values_in_the_order_asked(client: TestClient, order: list[str]) -> None:
    """What tritonclient reads: every output binary, each one's bytes where the document says, so that
    `as_numpy("mu")` is mu and not logvar (two outputs of equal size pass any size check)."""
    mu, logvar = rest_encode(client)
    body, headers = binary_request([("images_uint8", "UINT8", PIXELS)], parameters={"binary_data_output": True},
                                   outputs=[{"name": name} for name in order])
    r = client.post(INFER.format("vae.encode"), content=body, headers=headers)
    doc = json.loads(r.content[:int(r.headers["inference-header-content-length"])])
    assert [o["name"] for o in doc["outputs"]] == order and all("data" not in o for o in doc["outputs"])
    got = outputs_of(r)
    np.testing.assert_allclose(got["mu"], mu, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["logvar"], logvar, rtol=1e-5, atol=1e-6)
