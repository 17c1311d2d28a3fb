"""Builds the app: settings, lifespan, middleware, error mapping, routers. Nothing else lives here.

Where a request goes: middleware.py (request id, limits, access log, metrics.py), then a
router in api/routes/: model.py (the REST model endpoints), v2.py (the Open Inference
Protocol), ops.py (health, models, latent maps, metrics), docs.py, page.py (the page at /,
its files in static/). A model route opens with api/deps.py (queries.py validates its
query, formats.py picks PNG or JSON, the model is looked up), reads images with inputs.py
(imaging.py preprocesses them), asks the model's Engine in inference.py (batching.py
gathers concurrent calls), and answers with responses.py. Failures are domain errors
(exceptions.py) that errors.py maps to statuses.
"""

from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.routing import APIRoute
from starlette.responses import Response
from starlette.routing import request_response

from app import draining, errors, logs, supervisor, tracing, tuning
from app.access import AccessMiddleware, AccessRules
from app.api.routes import docs, model, ops, page, repository, v2
from app.artifacts import ModelLoadError, ServedModel
from app.batching import ComputeThread
from app.devices import resolve_device
from app.inference import Batching, Engine, Limits
from app.inputs import ImageReader
from app.metrics import Metrics
from app.middleware import Drain, HttpLimits, ServiceMiddleware, Slots
from app.protocol.codec import InferenceRequest
from app.repository import Repository
from app.rpc.service import GrpcServer, InferenceService
from app.schemas import (
    DecodeIn,
    ErrorOut,
    ImagesIn,
    ImagesOut,
    InferenceResponse,
    InterpolateIn,
    InterpolateOut,
    ProtocolErrorOut,
)
from app.settings import Settings, get_settings

log = logging.getLogger("app")
VERSION = "0.1.0"


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load, check and warm up every model once; the app answers 503 on model routes until then."""
    settings: Settings = app.state.settings
    device = resolve_device(settings.device)
    inline_threads, compute_threads = tuning.thread_counts(settings.threads, device, settings.workers)
    tuning.set_event_loop_threads(inline_threads)
    reader = ImageReader(settings.max_image_pixels, settings.request_timeout_s, settings.decoders or None)
    decoders_started = reader.start()  # the decoder processes start while the models load
    metrics: Metrics | None = app.state.metrics
    compute = ComputeThread(inline_threads, compute_threads)
    batching, limits = Batching.from_settings(settings), Limits.from_settings(settings)

    def make_engine(m: ServedModel) -> Engine:
        log.info("model %s version %s ready on %s (latent_dim=%d, %s)", m.name, m.version, m.device, m.latent_dim,
                 m.path)
        if metrics is not None:
            metrics.load_seconds.labels(m.name).set(m.load_seconds)
        return Engine(m, compute, batching, limits, metrics)

    repository = Repository(settings.models_dir, device, make_engine, settings.model_poll_s,
                            settings.request_timeout_s, supervisor.shared_file("repository.json"))
    try:
        repository.open(settings.default_model)
    except ModelLoadError as e:
        decoders_started.cancel()
        reader.close()
        compute.shutdown()
        log.error("start-up failed: %s", e)
        raise  # uvicorn reports the start-up failed and exits with status 3: never a half-ready service
    app.state.repository = repository
    await decoders_started
    app.state.image_reader = reader
    grpc_server = None
    if settings.grpc_port:
        service = InferenceService(app.state, settings, app.state.access_rules, app.state.slots, metrics, app.version)
        tls = (settings.ssl_certfile, settings.ssl_keyfile) if settings.ssl_certfile and settings.ssl_keyfile else None
        grpc_server = GrpcServer(service, settings.host, settings.grpc_port, settings.max_body_bytes, tls)
        await grpc_server.start(app.state.drain)
    tuning.freeze_startup_objects()
    repository.start_watching()
    app.state.ready = True
    supervisor.mark_ready()
    try:
        with draining.drain_on_sigterm(app.state.drain, settings.drain_delay_s):
            yield
    finally:
        app.state.ready = False
        if grpc_server is not None:
            await grpc_server.stop(settings.shutdown_grace_s)
        await repository.close()
        app.state.image_reader.close()
        tracing.shutdown()
        compute.shutdown()
        tuning.unfreeze()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The app factory (`uvicorn --factory app.main:create_app`); settings from VAE_* unless given."""
    settings = settings or get_settings()
    logs.configure(settings.log_level, settings.log_format)
    tracing.configure(VERSION)  # on only when OTEL_* variables ask for it
    app = FastAPI(
        title="MNIST VAE service",
        version=VERSION,
        telemetry=tracing.fastapi_telemetry(),  # type: ignore[arg-type]
        description="Encode, decode, sample, reconstruct and score digits with a variational autoencoder. "
        "Output format: `?format=png|json` wins, else the Accept header, else the endpoint's default.",
        lifespan=lifespan,
        docs_url=None,  # served from local assets by api/routes/docs.py
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.repository = None
    app.state.metrics = Metrics() if settings.metrics else None
    errors.install(app)
    app.state.drain = Drain()
    # Inside ServiceMiddleware: refusals carry the request id and are logged and counted like any answer
    app.state.access_rules = AccessRules.parse(settings.allowed_hosts, settings.allowed_origins,
                                               settings.api_key_list(), settings.open_ops)
    app.add_middleware(AccessMiddleware, rules=app.state.access_rules)
    app.state.slots = Slots(settings.max_in_flight, app.state.metrics)
    app.add_middleware(ServiceMiddleware, limits=HttpLimits(settings.max_body_bytes, settings.max_in_flight,
                                                        settings.max_receiving, settings.body_timeout_s),
                       metrics=app.state.metrics, drain=app.state.drain, slots=app.state.slots)
    routers = [model.router, v2.router, repository.router, ops.router,
               *([ops.metrics_router] if settings.metrics else []), docs.router,
               page.router if settings.page else page.docs_only, *([ops.bare_router] if settings.bare_endpoint else [])]
    add_routes(app, *routers)
    docs.mount_assets(app)
    if settings.page:
        page.mount(app)
    add_body_schemas(app)
    return app


def add_routes(app: FastAPI, *routers: APIRouter) -> None:
    """The routers' routes, in order, on the app's own route list, each answered the lean way when it can.

    `include_router` in this FastAPI (0.165) keeps each router as a nested matcher that every
    request walks: measured +10 µs per request in-process (docs/benchmarks.md#layout). These
    routers have no prefix or router-level dependencies to apply, so their routes (tags set)
    are added as they are, the model routes first since they carry the traffic.
    """
    for router in routers:
        for route in router.routes:
            if isinstance(route, APIRoute) and takes_request_answers_response(route):
                # Starlette's own request_response: what FastAPI's adds (dependencies solved, their exit
                # stacks, the answer serialised) has nothing to do for such an endpoint, and cost 14 µs
                # of an in-process /encode (docs/performance.md#the-request-path). OpenAPI is unchanged:
                # it is made from the route's declaration, not from its `app`.
                route.app = request_response(route.endpoint)
        app.router.routes.extend(router.routes)


def takes_request_answers_response(route: APIRoute) -> bool:
    """The endpoint's one parameter is the request, and it returns a Response (every model and protocol route)."""
    d = route.dependant
    if d.request_param_name is None or any((d.path_params, d.query_params, d.header_params, d.cookie_params,
                                            d.body_params, d.dependencies)):
        return False
    answer = typing.get_type_hints(route.endpoint).get("return")
    return isinstance(answer, type) and issubclass(answer, Response) and len(
        inspect.signature(route.endpoint).parameters) == 1


def add_body_schemas(app: FastAPI) -> None:
    """The hand-parsed bodies (ImagesIn, DecodeIn, InterpolateIn) and the error body are no route parameters or
    models, so FastAPI leaves their $refs dangling: add their schemas to the document FastAPI
    generates, keeping everything else."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = generate()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for body in (ImagesIn, DecodeIn, InterpolateIn, ImagesOut, InterpolateOut, ErrorOut, InferenceRequest,
                         InferenceResponse, ProtocolErrorOut):
                schema = body.model_json_schema(ref_template="#/components/schemas/{model}")
                components.update(schema.pop("$defs", {}))
                components[body.__name__] = schema
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]
