"""The Open Inference Protocol over gRPC: gRPC in, gRPC out, on VAE_GRPC_PORT.

`inference.GRPCInferenceService` (health, metadata, ModelInfer, the repository extension)
and the standard `grpc.health.v1.Health` service, served by grpc.aio on the REST app's own
event loop and process. So a gRPC call is the same work as a REST one: the same engines
(app/protocol/catalog.py runs both), batched with REST calls into the same forward passes,
under the same limits: the message size is VAE_MAX_BODY_BYTES, calls computing share
VAE_MAX_IN_FLIGHT with REST requests (RESOURCE_EXHAUSTED beyond it), the client's deadline
ends the call (DEADLINE_EXCEEDED), as VAE_REQUEST_TIMEOUT_S bounds decoding and the wait for a
forward pass, API keys come as `authorization: Bearer <key>` metadata, and every call is
counted in the metrics and the access log under its method's path, with its request id
(`x-request-id` metadata, echoed in the trailing metadata).
Domain errors become statuses in app/errors.py (`grpc_code`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from starlette.datastructures import State

from app import tracing
from app.access import AccessRules, key_refusal
from app.errors import error_message, grpc_code, protocol_status
from app.exceptions import InvalidInput, ServiceError, Unavailable, UnknownModel
from app.metrics import Metrics
from app.middleware import Drain, Slots
from app.protocol import catalog
from app.repository import Repository
from app.rpc import inference_pb2 as pb
from app.rpc.tensors import inputs_of, parameters_of, response_of
from app.settings import Settings

log = logging.getLogger("app.rpc")
access_log = logging.getLogger("app.access")
SERVICE = "inference.GRPCInferenceService"  # the protocol's name for it, whatever our proto's package
PROBES = ("ServerLive", "ServerReady", "ModelReady")  # answered while loading, never refused for load


class Call:
    """What a method tells the handler around it: the model it named (once known to be served), for the
    metrics and the access log."""

    __slots__ = ("model",)

    def __init__(self) -> None:
        self.model = ""


class InferenceService:
    def __init__(self, state: State, settings: Settings, rules: AccessRules, slots: Slots,
                 metrics: Metrics | None, version: str) -> None:
        self.state, self.settings, self.rules, self.slots, self.metrics = state, settings, rules, slots, metrics
        self.version = version

    # --- the methods ---------------------------------------------------------------------------

    async def server_live(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.ready())

    async def model_ready(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        """Ready or not, as Triton answers: a model that is not served (unknown, unloaded) is not ready."""
        if not self.ready():
            return pb.ModelReadyResponse(ready=False)
        try:
            catalog.resolve(self.repository(), request.name, request.version or None)
        except UnknownModel:
            return pb.ModelReadyResponse(ready=False)
        call.model = request.name  # only names served become label values: no client grows the metrics
        return pb.ModelReadyResponse(ready=True)

    async def server_metadata(self, request: pb.ServerMetadataRequest, call: Call) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=catalog.SERVER_NAME, version=self.version,
                                         extensions=catalog.EXTENSIONS)

    async def model_metadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        repository = self.repository()
        engine, capability = catalog.resolve(repository, request.name, request.version or None)
        call.model = request.name
        meta = catalog.metadata(request.name, engine, capability, repository.versions_of(engine.model.name))
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["inputs"]],
            outputs=[pb.ModelMetadataResponse.TensorMetadata(**t) for t in meta["outputs"]],
            properties={k: str(v) for k, v in meta["parameters"].items()})

    async def model_infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        engine, capability = catalog.resolve(self.repository(), request.model_name, request.model_version or None)
        call.model = request.model_name
        with tracing.span("decode tensors"):
            tensors = inputs_of(request)
        outputs, parameters = await capability.run(engine, tensors, parameters_of(request.parameters),
                                                   self.state.image_reader)
        with tracing.span("encode answer"):
            return response_of(request, engine.model.version, outputs, parameters)

    async def repository_index(self, request: pb.RepositoryIndexRequest, call: Call) -> pb.RepositoryIndexResponse:
        rows = self.repository().index(request.ready)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**r) for r in rows])

    async def repository_model_load(self, request: pb.RepositoryModelLoadRequest, call: Call
                                    ) -> pb.RepositoryModelLoadResponse:
        name = catalog.artifact_of(_model_name(request))
        await self.repository().load(name)
        call.model = name
        return pb.RepositoryModelLoadResponse(model_name=name, isLoaded=True)

    async def repository_model_unload(self, request: pb.RepositoryModelUnloadRequest, call: Call
                                      ) -> pb.RepositoryModelUnloadResponse:
        name = catalog.artifact_of(_model_name(request))
        await self.repository().unload(name)
        call.model = name
        return pb.RepositoryModelUnloadResponse(model_name=name, isUnloaded=True)

    # --- shared by every method ----------------------------------------------------------------

    def ready(self) -> bool:
        return bool(self.state.ready) and not self.state.drain.draining

    def repository(self) -> Repository:
        if not self.state.ready:
            raise Unavailable("models are still loading")
        return self.state.repository

    def handler(self, name: str, method: Callable[[Any, Call], Awaitable[Any]], request_type: Any,
                response_type: Any) -> grpc.RpcMethodHandler:
        path = f"/{SERVICE}/{name}"
        limited = name not in PROBES

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            start = time.perf_counter()
            metadata = {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}
            rid = metadata.get("x-request-id", "")[:128] or os.urandom(16).hex()
            context.set_trailing_metadata((("x-request-id", rid),))  # sent with the status: no extra write
            with tracing.grpc_span(SERVICE, name, metadata):
                call, status, code, took_slot = Call(), 200, grpc.StatusCode.OK, False
                try:
                    refusal = key_refusal(self.rules, path, metadata.get("authorization", "").encode("latin-1"))
                    if refusal is not None:
                        raise refusal
                    if limited:
                        if not self.slots.take():
                            raise self.slots.full()
                        took_slot = True
                    # The client's deadline cancels this coroutine (grpc.aio does) and answers DEADLINE_EXCEEDED;
                    # without one, VAE_REQUEST_TIMEOUT_S bounds the wait for decoding and for the forward
                    # pass as it does for REST (ComputeTimeout). No wait_for: its task per call, with a
                    # separate write of the initial metadata, cost 30% at c=1 (bench.serve: 1194 -> 1696 req/s).
                    return await method(request, call)
                except ServiceError as e:
                    status, code = protocol_status(e), grpc_code(e)
                    await context.abort(code, error_message(e))
                except asyncio.CancelledError:  # the client cancelled, went away, or its deadline passed
                    status, code = 499, grpc.StatusCode.CANCELLED
                    raise
                except Exception as e:
                    status, code = 500, grpc.StatusCode.INTERNAL
                    log.error("unhandled %s in %s", type(e).__name__, name, exc_info=e)
                    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
                finally:
                    if took_slot:
                        self.slots.release()
                    self._done(path, call.model, rid, status, code, start)

        return grpc.unary_unary_rpc_method_handler(handle, request_deserializer=request_type.FromString,
                                                   response_serializer=response_type.SerializeToString)

    def _done(self, path: str, model: str, rid: str, status: int, code: grpc.StatusCode, start: float) -> None:
        seconds = time.perf_counter() - start
        if self.metrics is not None:
            self.metrics.observe_request(path, model, status, seconds)
        if tracing.tracer is not None:
            tracing.finish_request(rid, code)
        if access_log.isEnabledFor(logging.INFO):
            record = {"request_id": rid, "method": "GRPC", "path": path, "status": status, "grpc_status": code.name,
                      "latency_ms": round(seconds * 1000, 2), **({"model": model} if model else {}),
                      **tracing.ids()}
            access_log.info(json.dumps(record), extra={"access": record})

    def handlers(self) -> grpc.GenericRpcHandler:
        methods = {
            "ServerLive": (self.server_live, pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (self.server_ready, pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (self.model_ready, pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (self.server_metadata, pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (self.model_metadata, pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (self.model_infer, pb.ModelInferRequest, pb.ModelInferResponse),
            "RepositoryIndex": (self.repository_index, pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
            "RepositoryModelLoad": (self.repository_model_load, pb.RepositoryModelLoadRequest,
                                    pb.RepositoryModelLoadResponse),
            "RepositoryModelUnload": (self.repository_model_unload, pb.RepositoryModelUnloadRequest,
                                      pb.RepositoryModelUnloadResponse),
        }
        return grpc.method_handlers_generic_handler(
            SERVICE, {name: self.handler(name, *spec) for name, spec in methods.items()})


def _model_name(request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> str:
    """Triton's clients put the model in field 2 (model_name), KServe's in field 1 (our repository_name)."""
    name = request.model_name or request.repository_name
    if not name:
        raise InvalidInput("name the model to load or unload (model_name)")
    return name


class GrpcServer:
    """The gRPC server of one worker: started once the models are loaded, stopped on shutdown. With
    several workers each binds the same port (SO_REUSEPORT, grpc's default), as they share the HTTP one."""

    def __init__(self, service: InferenceService, host: str, port: int, max_message_bytes: int,
                 tls: tuple[Path, Path] | None = None) -> None:
        self.service, self.address = service, f"{host}:{port}"
        self.server = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 1),
        ])
        self.server.add_generic_rpc_handlers((service.handlers(),))
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        self._drain_watch: asyncio.Task[None] | None = None
        if tls is None:
            self.port = self.server.add_insecure_port(self.address)
        else:  # the HTTPS certificate (VAE_SSL_*): an API key never crosses the network in the clear
            certfile, keyfile = tls
            credentials = grpc.ssl_server_credentials([(keyfile.read_bytes(), certfile.read_bytes())])
            self.port = self.server.add_secure_port(self.address, credentials)
        if self.port == 0:
            raise OSError(f"cannot bind the gRPC port {self.address} (VAE_GRPC_PORT)")

    async def start(self, drain: Drain) -> None:
        await self.server.start()
        await self.serving(True)
        self._drain_watch = asyncio.get_running_loop().create_task(self._not_serving_on(drain))
        log.info("gRPC (Open Inference Protocol, health) on %s", self.address)

    async def _not_serving_on(self, drain: Drain) -> None:
        """SIGTERM (app/draining.py): the health service says NOT_SERVING, as /readyz says 503."""
        while not drain.draining:
            await asyncio.sleep(0.2)
        await self.serving(False)

    async def serving(self, yes: bool) -> None:
        """What the health service answers, for the server ("") and the inference service by name."""
        status = health_pb2.HealthCheckResponse.SERVING if yes else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace_s: float) -> None:
        if self._drain_watch is not None:
            self._drain_watch.cancel()
        await self.serving(False)
        await self.server.stop(grace_s)
