"""Who may drive the service: Host allow-list, Origin check, API keys, and HTTPS (app/access.py)."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from tests.conftest import TEST_DATA, free_port, vae_serve

DIGIT = (TEST_DATA / "mnist_test_0_digit_7.png").read_bytes()
KEY = "s3cret-key-1"
PNG = {"content-type": "image/png"}


@pytest.fixture(scope="module")
def locked(models_dir: Path) -> Iterator[TestClient]:
    settings = Settings(models_dir=models_dir, default_model="vae", allowed_hosts="localhost,127.0.0.1,::1",
                        allowed_origins="https://app.example.com", api_keys=f"{KEY}, other-key")
    with TestClient(create_app(settings), base_url="http://localhost:8000") as client:
        yield client


def bearer(key: str = KEY) -> dict[str, str]:
    return {**PNG, "authorization": f"Bearer {key}"}


def test_a_host_not_on_the_list_is_refused_before_anything_else(locked: TestClient) -> None:
    r = locked.post("/encode", content=DIGIT, headers={**bearer(), "host": "attacker.example"})
    assert r.status_code == 400 and r.json()["error"] == "host not allowed"
    assert "attacker.example" in r.json()["detail"] and "VAE_ALLOWED_HOSTS" in r.json()["detail"]
    assert locked.get("/healthz", headers={"host": "attacker.example:8000"}).status_code == 400
    for host in ("localhost:8000", "127.0.0.1", "[::1]:8000", "LOCALHOST"):
        assert locked.post("/encode", content=DIGIT, headers={**bearer(), "host": host}).status_code == 200, host


def test_a_browser_request_from_another_site_is_refused(locked: TestClient) -> None:
    files = {"file": ("d.png", DIGIT, "image/png")}
    cross = locked.post("/anomaly-score", files=files, headers={"authorization": f"Bearer {KEY}",
                                                                "origin": "https://evil.example"})
    assert cross.status_code == 403 and cross.json()["error"] == "origin not allowed"
    assert "https://evil.example" in cross.json()["detail"]
    null = locked.post("/encode", content=DIGIT, headers={**bearer(), "origin": "null"})  # a sandboxed frame
    assert null.status_code == 403
    for origin in ("http://localhost:8000", "https://localhost:8000", "https://app.example.com"):
        r = locked.post("/encode", content=DIGIT, headers={**bearer(), "origin": origin})
        assert r.status_code == 200, origin  # the page's own origin (behind TLS too), and the listed one


def test_model_endpoints_need_a_valid_key_and_say_how_to_send_one(locked: TestClient) -> None:
    missing = locked.post("/encode", content=DIGIT, headers=PNG)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == 'Bearer realm="vae"'
    assert missing.json() == {"error": "API key needed",
                              "detail": "this endpoint needs an API key: send 'Authorization: Bearer <key>'"}
    wrong = locked.post("/encode", content=DIGIT, headers=bearer("s3cret-key-2"))
    assert wrong.status_code == 401 and wrong.json()["error"] == "invalid API key"
    assert wrong.headers["www-authenticate"] == 'Bearer realm="vae", error="invalid_token"'
    assert locked.post("/encode", content=DIGIT, headers={**PNG, "authorization": KEY}).status_code == 401  # no scheme
    assert locked.post("/encode", content=DIGIT, headers={**PNG, "authorization": f"Basic {KEY}"}).status_code == 401
    for key in (KEY, "other-key"):
        assert locked.post("/encode", content=DIGIT, headers=bearer(key)).status_code == 200
    assert locked.get("/sample?n=1").status_code == 401 and locked.get("/models").status_code == 401
    assert locked.get("/sample?n=1", headers={"authorization": f"bearer {KEY}"}).status_code == 200


def test_protocol_endpoints_need_the_key_and_answer_in_the_protocol_shape(locked: TestClient) -> None:
    body = {"inputs": [{"name": "images_uint8", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    refused = locked.post("/v2/models/vae.encode/infer", json=body)
    assert refused.status_code == 401 and refused.json() == {
        "error": "API key needed: this endpoint needs an API key: send 'Authorization: Bearer <key>'"}
    assert locked.get("/v2/models/vae.encode").status_code == 401
    assert locked.post("/v2/models/vae.encode/infer", json=body, headers={"authorization": f"Bearer {KEY}"}
                       ).status_code == 200


def test_health_metrics_page_and_docs_stay_open(locked: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready", "/", "/docs",
                 "/openapi.json", "/static/page.js"):
        assert locked.get(path).status_code == 200, path


def test_ops_endpoints_can_need_the_key_too(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, default_model="vae", api_keys=KEY, open_ops=False)
    with TestClient(create_app(settings)) as client:
        assert client.get("/healthz").status_code == 401 and client.get("/metrics").status_code == 401
        assert client.get("/healthz", headers={"authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/").status_code == 200  # the page, which asks for the key


def test_keys_come_from_a_file_too_and_are_never_shown(models_dir: Path, tmp_path: Path, caplog) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\nfile-key-1\n  file-key-2  \n")
    settings = Settings(models_dir=models_dir, default_model="vae", api_keys="env-key", api_keys_file=keys)
    assert settings.api_key_list() == ["env-key", "file-key-1", "file-key-2"]
    assert "env-key" not in repr(settings) and "env-key" not in str(settings.model_dump())
    caplog.set_level(logging.INFO)
    with TestClient(create_app(settings)) as client:
        for key in ("env-key", "file-key-2"):
            assert client.post("/encode", content=DIGIT, headers=bearer(key)).status_code == 200
        assert client.post("/encode", content=DIGIT, headers=bearer("file-key-3")).status_code == 401
    assert not any(k in caplog.text for k in ("env-key", "file-key-1", "file-key-2", "file-key-3"))


def test_without_settings_any_host_and_no_key(models_dir: Path) -> None:
    with TestClient(create_app(Settings(models_dir=models_dir, default_model="vae"))) as client:
        assert client.post("/encode", content=DIGIT, headers={**PNG, "host": "vae.internal:8000"}).status_code == 200


@pytest.mark.slow
def test_vae_serve_on_loopback_refuses_foreign_host_names_and_serves_https(models_dir: Path, tmp_path: Path) -> None:
    """DNS rebinding: a page at attacker.example whose name now resolves to 127.0.0.1 sends Host:
    attacker.example; vae-serve on loopback answers only its loopback names. And HTTPS through uvicorn's
    certificate options, to a certificate authority made here."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    cert.private_key_pem.write_to_path(tmp_path / "server.key")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    env = {"VAE_MODELS_DIR": str(models_dir), "VAE_SSL_CERTFILE": str(tmp_path / "server.pem"),
           "VAE_SSL_KEYFILE": str(tmp_path / "server.key"), "VAE_API_KEYS": KEY}
    grpc_port = free_port()
    env["VAE_GRPC_PORT"] = str(grpc_port)
    context = ssl.create_default_context(cafile=str(tmp_path / "ca.pem"))
    with vae_serve(env, scheme="https", verify=context) as (base, _):
        # gRPC under the same certificate: the API key in its metadata is never sent in the clear
        from app.rpc import inference_pb2 as pb

        credentials = grpc.ssl_channel_credentials((tmp_path / "ca.pem").read_bytes())
        with grpc.secure_channel(f"localhost:{grpc_port}", credentials) as channel:
            live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                       request_serializer=pb.ServerLiveRequest.SerializeToString,
                                       response_deserializer=pb.ServerLiveResponse.FromString)
            assert live(pb.ServerLiveRequest(), timeout=30).live
        with grpc.insecure_channel(f"localhost:{grpc_port}") as channel, pytest.raises(grpc.RpcError):
            channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                request_serializer=pb.ServerLiveRequest.SerializeToString,
                                response_deserializer=pb.ServerLiveResponse.FromString)(pb.ServerLiveRequest(),
                                                                                         timeout=5)
        with httpx.Client(base_url=base, verify=context, timeout=30) as client:
            r = client.post("/encode", content=DIGIT, headers=bearer())
            assert r.status_code == 200 and r.json()["model"] == "vae"
            assert client.get("/models", headers={"host": "attacker.example", "authorization": f"Bearer {KEY}"}
                              ).status_code == 400
            assert client.post("/encode", content=DIGIT, headers=PNG).status_code == 401
        with pytest.raises(httpx.ConnectError):  # a client that does not trust the certificate
            httpx.get(f"{base}/healthz")
