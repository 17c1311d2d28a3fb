"""The gRPC service in process (app/rpc/): each status code a malformed or refused call gets, with a
message that says what to fix; the limits, API keys, request ids and metrics it shares with REST;
typed contents; the health service. Real clients (tritonclient.grpc, KServe) are in
tests/test_protocol_clients.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient
from grpc_health.v1 import health_pb2, health_pb2_grpc

from app.main import create_app
from app.rpc import inference_pb2 as pb
from app.rpc.service import SERVICE
from tests.conftest import free_port
from tests.test_api import settings
from tests.test_protocol import PIXELS, PNGS

KEY = "grpc-test-key"


class Stub:
    """The inference service's methods on a channel, through this service's own messages."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def __call__(self, method: str, request: object, metadata: tuple = (), timeout: float = 30) -> object:
        response = getattr(pb, f"{method}Response")
        call = self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                                        response_deserializer=response.FromString)
        return call(request, metadata=metadata, timeout=timeout)

    def with_call(self, method: str, request: object, metadata: tuple = ()) -> tuple[object, grpc.Call]:
        response = getattr(pb, f"{method}Response")
        call = self.channel.unary_unary(f"/{SERVICE}/{method}", request_serializer=type(request).SerializeToString,
                                        response_deserializer=response.FromString)
        return call.with_call(request, metadata=metadata, timeout=30)


@pytest.fixture(scope="module")
def served(models_dir: Path) -> Iterator[tuple[TestClient, Stub]]:
    port = free_port()
    app = create_app(settings(models_dir, grpc_port=port, max_batch=8, max_body_bytes=200_000,
                              api_keys=KEY, open_ops=True))
    with TestClient(app) as client, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield client, Stub(channel)


AUTH = (("authorization", f"Bearer {KEY}"),)


def encode_request(pixels: np.ndarray = PIXELS, **fields: object) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="vae.encode", **fields)
    request.inputs.add(name="images_uint8", datatype="UINT8", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    return request


def refusal(stub: Stub, method: str, request: object, metadata: tuple = AUTH) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        stub(method, request, metadata)
    return e.value.code(), e.value.details()


def test_infer_with_raw_or_typed_contents_equals_rest_encode(served: tuple[TestClient, Stub]) -> None:
    client, stub = served
    files = [("file", (f"{i}.png", b, "image/png")) for i, b in enumerate(PNGS)]
    rest = client.post("/encode", files=files, headers={"Authorization": f"Bearer {KEY}"}).json()["results"]
    raw = stub("ModelInfer", encode_request(id="r7"), AUTH)
    assert (raw.model_name, raw.model_version, raw.id) == ("vae.encode", "1", "r7")
    assert [(o.name, o.datatype, list(o.shape)) for o in raw.outputs] == [("mu", "FP32", [3, 2]),
                                                                          ("logvar", "FP32", [3, 2])]
    mu = np.frombuffer(raw.raw_output_contents[0], np.float32).reshape(3, 2)
    np.testing.assert_array_equal(mu, np.array([r["mu"] for r in rest], np.float32))
    typed = pb.ModelInferRequest(model_name="vae.encode")
    typed.inputs.add(name="images", datatype="FP32", shape=[3, 1, 28, 28]).contents.fp32_contents.extend(
        (PIXELS / 255).astype(np.float32).reshape(-1).tolist())
    typed.outputs.add(name="logvar")
    answer = stub("ModelInfer", typed, AUTH)
    assert [o.name for o in answer.outputs] == ["logvar"]
    np.testing.assert_allclose(np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 2),
                               [r["logvar"] for r in rest], atol=1e-6)


def test_parameters_travel_both_ways(served: tuple[TestClient, Stub]) -> None:
    _, stub = served
    request = encode_request()
    request.model_name = "vae.anomaly-score"
    request.parameters["seed"].int64_param = 3
    request.parameters["k"].int64_param = 16
    first, second = stub("ModelInfer", request, AUTH), stub("ModelInfer", request, AUTH)
    assert first.raw_output_contents == second.raw_output_contents  # the seed holds
    assert first.parameters["k"].int64_param == 16 and first.parameters["method"].string_param
    request.parameters["k"].string_param = "many"
    code, message = refusal(stub, "ModelInfer", request)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "k" in message


@pytest.mark.parametrize(("mutate", "code", "says"), [
    (lambda r: setattr(r, "model_name", "nope.encode"), grpc.StatusCode.NOT_FOUND, "unknown model: 'nope.encode'"),
    (lambda r: setattr(r, "model_version", "7"), grpc.StatusCode.NOT_FOUND, "has no version '7'; served: 1"),
    (lambda r: r.inputs[0].shape.__setitem__(2, 27), grpc.StatusCode.INVALID_ARGUMENT,
     "input 'images_uint8': shape [3, 28, 27] of UINT8 is 2268 bytes; binary_data_size says 2352"),
    (lambda r: r.raw_input_contents.append(b"x"), grpc.StatusCode.INVALID_ARGUMENT,
     "2 raw_input_contents for 1 inputs"),
    (lambda r: setattr(r.inputs[0], "datatype", "COMPLEX"), grpc.StatusCode.INVALID_ARGUMENT,
     "datatype 'COMPLEX' is none of BOOL"),
    (lambda r: setattr(r.inputs[0], "name", "pictures"), grpc.StatusCode.INVALID_ARGUMENT,
     "unknown input 'pictures'; this model takes images, images_uint8, image_files"),
    (lambda r: r.outputs.add(name="sigma"), grpc.StatusCode.INVALID_ARGUMENT,
     "output 'sigma': model 'vae.encode' has outputs mu, logvar"),
])
def test_a_malformed_call_gets_its_code_and_what_to_fix(served: tuple[TestClient, Stub], mutate, code, says) -> None:
    _, stub = served
    request = encode_request()
    mutate(request)
    got, message = refusal(stub, "ModelInfer", request)
    assert got == code
    assert says in message


def test_typed_contents_are_checked(served: tuple[TestClient, Stub]) -> None:
    _, stub = served
    request = pb.ModelInferRequest(model_name="vae.encode")
    request.inputs.add(name="images_uint8", datatype="UINT8", shape=[1, 28, 28]).contents.uint_contents.extend(
        [300] * 784)
    assert refusal(stub, "ModelInfer", request) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "invalid request: input 'images_uint8': a value in contents.uint_contents is not representable as UINT8")
    del request.inputs[0].contents.uint_contents[1:]
    assert refusal(stub, "ModelInfer", request)[1].endswith(
        "shape [1, 28, 28] needs 784 values; contents.uint_contents holds 1")


def test_limits_keys_and_overload(served: tuple[TestClient, Stub]) -> None:
    client, stub = served
    big = np.zeros((9, 28, 28), np.uint8)
    assert refusal(stub, "ModelInfer", encode_request(big)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "batch too large: 9 images; the limit is 8 (VAE_MAX_BATCH)")
    huge = encode_request(np.zeros((300, 28, 28), np.uint8))  # 235 kB over the 200 kB message limit
    assert refusal(stub, "ModelInfer", huge)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert refusal(stub, "ModelInfer", encode_request(), metadata=()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "API key needed: this endpoint needs an API key: send 'Authorization: Bearer <key>'")
    assert refusal(stub, "ModelInfer", encode_request(), metadata=(("authorization", "Bearer nope"),))[1] == (
        "invalid API key: the API key is not valid")
    assert stub("ServerLive", pb.ServerLiveRequest()).live  # a probe: no key needed (VAE_OPEN_OPS)
    slots = client.app.state.slots
    slots.in_flight = slots.limit  # as if every slot were taken by REST requests
    try:
        code, message = refusal(stub, "ModelInfer", encode_request())
        assert stub("ModelReady", pb.ModelReadyRequest(name="vae.encode"), AUTH).ready  # probes: never refused for load
    finally:
        slots.in_flight = 0
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 256 (VAE_MAX_IN_FLIGHT)" in message


def test_request_ids_metrics_and_health(served: tuple[TestClient, Stub]) -> None:
    client, stub = served
    _, call = stub.with_call("ModelInfer", encode_request(), (*AUTH, ("x-request-id", "grpc-abc")))
    assert ("x-request-id", "grpc-abc") in call.trailing_metadata()
    _, call = stub.with_call("ServerReady", pb.ServerReadyRequest())
    assert len(dict(call.trailing_metadata())["x-request-id"]) == 32  # made when none was sent
    metrics = client.get("/metrics").text
    assert (f'vae_requests_total{{endpoint="/{SERVICE}/ModelInfer",model="vae.encode",status="200"}}'
            in metrics)
    # a model name nobody serves is no label value: a client must not grow the metrics without bound
    assert f'vae_requests_total{{endpoint="/{SERVICE}/ModelInfer",model="",status="404"}}' in metrics
    health = health_pb2_grpc.HealthStub(stub.channel)
    for service in ("", SERVICE):
        assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == (
            health_pb2.HealthCheckResponse.SERVING)


def test_metadata_and_repository_over_grpc(served: tuple[TestClient, Stub]) -> None:
    _, stub = served
    meta = stub("ModelMetadata", pb.ModelMetadataRequest(name="vae.sample"), AUTH)
    assert (meta.name, list(meta.versions), meta.platform) == ("vae.sample", ["1"], "pytorch_torchscript")
    assert [i.name for i in meta.inputs] == ["n", "seed", "temperature", "digit"]
    assert meta.properties["latent_dim"] == "2"
    server = stub("ServerMetadata", pb.ServerMetadataRequest(), AUTH)
    assert (server.name, list(server.extensions)) == ("mnist-vae-service", ["binary_tensor_data"])
    index = stub("RepositoryIndex", pb.RepositoryIndexRequest(), AUTH)
    assert sorted((m.name, m.version, m.state) for m in index.models) == [("deep-tiny", "1", "READY"),
                                                                         ("vae", "1", "READY")]
    # KServe's clients name the model in field 1, Triton's in field 2: both are understood
    gone = stub("RepositoryModelUnload", pb.RepositoryModelUnloadRequest(repository_name="deep-tiny.encode"), AUTH)
    assert (gone.model_name, gone.isUnloaded) == ("deep-tiny", True)
    assert not stub("ModelReady", pb.ModelReadyRequest(name="deep-tiny.encode"), AUTH).ready
    back = stub("RepositoryModelLoad", pb.RepositoryModelLoadRequest(model_name="deep-tiny"), AUTH)
    assert (back.model_name, back.isLoaded) == ("deep-tiny", True)
    assert stub("ModelReady", pb.ModelReadyRequest(name="deep-tiny.encode"), AUTH).ready
    assert refusal(stub, "RepositoryModelLoad", pb.RepositoryModelLoadRequest()) == (
        grpc.StatusCode.INVALID_ARGUMENT, "invalid request: name the model to load or unload (model_name)")


def test_the_checked_in_messages_are_generated_from_the_proto(tmp_path: Path) -> None:
    """`make proto` would write exactly the files checked in (grpcio-tools is pinned for that)."""
    from grpc_tools import protoc

    repo = Path(__file__).resolve().parents[1]
    assert protoc.main(["protoc", f"-I{repo}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
                        str(repo / "app/rpc/inference.proto")]) == 0
    for name in ("inference_pb2.py", "inference_pb2.pyi"):
        assert (tmp_path / "app/rpc" / name).read_text() == (repo / "app/rpc" / name).read_text(), name
