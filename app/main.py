"""The FastAPI app: lifespan loads the models, routes stay thin.

Where a request goes: queries.py validates its query string, inputs.py reads images
out of it, imaging.py preprocesses them, inference.py runs the model (batching.py
gathers concurrent calls and picks the thread), formats.py picks PNG or JSON,
errors.py shapes every failure.
"""

from __future__ import annotations

import base64
import gc
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response

from app import errors, inference
from app.batching import ComputeThread
from app.errors import ApiError, error_response
from app.formats import MEDIA, JsonResponse, negotiate
from app.imaging import to_png
from app.inference import Engine
from app.inputs import ImagesIn, decoder, parse_body, read_images
from app.middleware import ServiceMiddleware
from app.models import ModelLoadError, load_models, resolve_device, warm_up
from app.queries import (
    AnomalyQuery,
    DecodeQuery,
    EncodeQuery,
    ReconstructQuery,
    SampleQuery,
    openapi_parameters,
    parse_query,
)
from app.schemas import (
    ERRORS,
    IMAGE_BODY,
    PNG_RESPONSE,
    AnomalyOut,
    DecodeIn,
    EncodeOut,
    ImagesOut,
)
from app.settings import Settings, get_settings

log = logging.getLogger("app")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    device = resolve_device(settings.device)
    inline_threads, compute_threads = thread_counts(settings.threads, device, settings.workers)
    if inline_threads:
        torch.set_num_threads(inline_threads)  # before any pass: this thread runs the short ones
    try:
        models = load_models(settings.models_dir, device, settings.default_model)
    except ModelLoadError as e:
        log.error("start-up failed: %s", e)
        raise  # uvicorn reports the start-up failed and exits with status 3: never a half-ready service
    for m in models.values():
        warm_up(m)
        log.info("model %s ready on %s (latent_dim=%d, %s)", m.name, m.device, m.latent_dim, m.path)
    compute = ComputeThread(inline_threads, compute_threads)
    wait, inline_max = settings.batch_max_wait_us / 1e6, settings.inline_max_us / 1e6
    app.state.engines = {n: Engine(m, compute, settings.batch_max_size, wait, settings.request_timeout_s, inline_max)
                         for n, m in models.items()}
    # Everything loaded so far lives as long as the process: move it out of the garbage
    # collector's sight, or each full collection walks ~400k objects (a 100 ms stall at p99).
    gc.collect()
    gc.freeze()
    app.state.ready = True
    try:
        yield
    finally:
        app.state.ready = False
        for engine in app.state.engines.values():
            engine.close()
        compute.shutdown()
        gc.unfreeze()


def thread_counts(setting: int, device: torch.device, workers: int = 1) -> tuple[int, int]:
    """torch intra-op threads for (event-loop passes, compute-thread passes); 0 keeps torch's default.

    Set once, before the first pass: changing the count at run time (to give the compute
    thread its cores back while it works) left every later pass ~30% slower, for reasons
    we did not find. Measured on 2 cores (docs/benchmarks.md#serving): every core for the
    event loop's short passes and one less for the compute thread is best for /encode
    (0.50 ms p50 at c=1, ~4,850 req/s at c=32); the compute thread with every core made
    c=1 /encode 60% slower; one thread each (VAE_THREADS=1) is ~2x better for traffic
    dominated by large anomaly scores, whose long passes then do not compete with the
    event loop's OpenMP worker. Several workers share the cores: two workers with two
    threads each on 2 cores served /encode at c=32 at 3,100 req/s, with one each at 7,500.
    """
    if setting:
        return setting, setting
    if device.type != "cpu":
        return 0, 0
    cores = max(1, (os.cpu_count() or 1) // workers)
    return cores, max(1, cores - 1)


def configure_logging(level: str) -> None:
    """Give the app's loggers a handler when nobody else did (plain `uvicorn app.main:app`)."""
    logger = logging.getLogger("app")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    configure_logging(settings.log_level)
    app = FastAPI(
        title="MNIST VAE service",
        version="0.1.0",
        description="Encode, decode, sample, reconstruct and score digits with a variational autoencoder. "
        "Output format: `?format=png|json` wins, else the Accept header, else the endpoint's default.",
        lifespan=lifespan,
        responses={k: v for k, v in ERRORS.items() if k in (400, 404, 422, 503, 504)},
    )
    app.state.settings = settings
    app.state.ready = False
    app.state.engines = {}
    app.state.decode = decoder(settings.max_image_pixels)
    errors.install(app)
    app.add_middleware(ServiceMiddleware, max_body_bytes=settings.max_body_bytes, max_in_flight=settings.max_in_flight)
    add_routes(app, settings)
    app.openapi = lambda: openapi_with_bodies(app)  # type: ignore[method-assign]
    return app


def openapi_with_bodies(app: FastAPI) -> dict[str, Any]:
    """The hand-parsed request bodies (ImagesIn, DecodeIn) are not route parameters, so FastAPI
    would leave their $refs dangling; add their schemas to the components."""
    if app.openapi_schema is None:
        spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        components = spec.setdefault("components", {}).setdefault("schemas", {})
        for model in (ImagesIn, DecodeIn, ImagesOut):
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(schema.pop("$defs", {}))
            components[model.__name__] = schema
        app.openapi_schema = spec
    return app.openapi_schema


def engine_for(request: Request, name: str | None) -> Engine:
    engines: dict[str, Engine] = request.app.state.engines
    if not request.app.state.ready:
        raise ApiError(503, "not ready", "models are still loading", {"Retry-After": "1"})
    name = name or request.app.state.settings.default_model
    if name not in engines:
        raise ApiError(404, "unknown model", f"{name!r}; available: {sorted(engines)}")
    request.state.model = name
    return engines[name]


def _pixels(images: torch.Tensor) -> list[list[list[float]]]:
    return [[[round(v, 5) for v in row] for row in img[0].tolist()] for img in images]


def images_response(fmt: str, encoding: str, images: torch.Tensor, payload: dict[str, Any],
                    png: torch.Tensor | None = None, nrow: int | None = None,
                    headers: dict[str, str] | None = None) -> Response:
    if fmt == "png":
        return Response(to_png(images if png is None else png, nrow), media_type=MEDIA["png"], headers=headers)
    if encoding == "base64":
        payload["png_base64"] = [base64.b64encode(to_png(img[None])).decode() for img in images]
    else:
        payload["images"] = _pixels(images)
    return JsonResponse({k: v for k, v in payload.items() if v is not None}, headers=headers)


def add_routes(app: FastAPI, settings: Settings) -> None:
    @app.get("/healthz", tags=["ops"], summary="Process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="200 once every model is loaded and warmed up, 503 before",
             responses={503: ERRORS[503]})
    async def readyz(request: Request) -> JSONResponse:
        if not request.app.state.ready:
            return error_response(503, "not ready", "models are loading", {"Retry-After": "1"})
        return JSONResponse({"status": "ready", "models": sorted(request.app.state.engines)})

    @app.get("/models", tags=["ops"], summary="Each model's meta.json, the device it runs on, and batching "
             "counts since start (requests and forward passes per method, in the worker process that answered)")
    async def models(request: Request) -> dict[str, Any]:
        engines: dict[str, Engine] = request.app.state.engines
        return {"default": settings.default_model, "worker_pid": os.getpid(),
                "models": [{**e.model.describe(), "batching": e.stats()} for e in engines.values()]}

    @app.post("/encode", tags=["model"], summary="Image(s) to the posterior mean and log-variance",
              response_model=EncodeOut, response_model_exclude_none=True,
              openapi_extra={**IMAGE_BODY, "parameters": openapi_parameters(EncodeQuery)},
              responses={k: ERRORS[k] for k in (406, 413, 415)})
    async def encode(request: Request) -> Any:
        q = parse_query(EncodeQuery, request)
        negotiate(request, q.fmt, "json", allowed=("json",))
        engine = engine_for(request, q.model)
        x = await read_images(request, settings.max_batch, request.app.state.decode, q.preprocess)
        mu, logvar = await inference.encode(engine, x)
        out: dict[str, Any] = {"model": engine.model.name, "latent_dim": engine.model.latent_dim}
        if x.shape[0] == 1:
            out["mu"], out["logvar"] = mu.tolist()[0], logvar.tolist()[0]
        else:
            out["results"] = [{"mu": m, "logvar": lv} for m, lv in zip(mu.tolist(), logvar.tolist(), strict=True)]
        return JsonResponse(out)  # a Response skips FastAPI's re-validation of what we just built

    @app.post("/decode", tags=["model"], summary="Latent vectors to images (PNG grid or JSON)",
              responses={**PNG_RESPONSE, **{k: ERRORS[k] for k in (406, 413, 415)}},
              openapi_extra={"parameters": openapi_parameters(DecodeQuery), "requestBody": {
                  "required": True, "content": {"application/json": {
                      "schema": {"$ref": "#/components/schemas/DecodeIn"}, "example": {"z": [[0.0, 0.0]]}}}}})
    async def decode(request: Request) -> Response:
        q = parse_query(DecodeQuery, request)
        chosen = negotiate(request, q.fmt, "png")
        engine = engine_for(request, q.model)
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise ApiError(415, "unsupported media type", "send application/json: {\"z\": [[...], ...]}")
        body = parse_body(DecodeIn, await request.body())
        d = engine.model.latent_dim
        if len(body.z) > settings.max_batch:
            raise ApiError(413, "batch too large", f"{len(body.z)} vectors; the limit is {settings.max_batch}")
        for i, row in enumerate(body.z):
            if len(row) != d:
                raise ApiError(422, "wrong latent size", f"z[{i}] has {len(row)} values; model "
                               f"{engine.model.name!r} has latent_dim={d}")
        images = await inference.decode(engine, torch.tensor(body.z, dtype=torch.float32))
        return images_response(chosen, q.encoding, images, {"model": engine.model.name})

    @app.get("/sample", tags=["model"], summary="n images from z ~ N(0, T² I)",
             openapi_extra={"parameters": openapi_parameters(SampleQuery)},
             responses={**PNG_RESPONSE, **{k: ERRORS[k] for k in (406, 413)}})
    async def sample(request: Request) -> Response:
        q = parse_query(SampleQuery, request)
        chosen = negotiate(request, q.fmt, "png")
        engine = engine_for(request, q.model)
        if q.n > settings.max_samples:
            raise ApiError(413, "too many samples", f"n={q.n}; the limit is {settings.max_samples} (VAE_MAX_SAMPLES)")
        seed = inference.new_seed() if q.seed is None else q.seed
        z, images = await inference.sample(engine, q.n, seed, q.temperature)
        return images_response(chosen, q.encoding, images,
                               {"model": engine.model.name, "seed": seed, "z": z.tolist()},
                               headers={"X-Seed": str(seed)})

    @app.post("/reconstruct", tags=["model"], summary="Image(s) to reconstruction(s): PNG rows of original | "
              "reconstruction, or JSON",
              openapi_extra={**IMAGE_BODY, "parameters": openapi_parameters(ReconstructQuery)},
              responses={**PNG_RESPONSE, **{k: ERRORS[k] for k in (406, 413, 415)}})
    async def reconstruct(request: Request) -> Response:
        q = parse_query(ReconstructQuery, request)
        chosen = negotiate(request, q.fmt, "png")
        engine = engine_for(request, q.model)
        x = await read_images(request, settings.max_batch, request.app.state.decode, q.preprocess)
        recon = await inference.reconstruct(engine, x)
        pairs = torch.stack([x, recon], dim=1).reshape(-1, 1, 28, 28)  # original, reconstruction, ...
        payload: dict[str, Any] = {"model": engine.model.name}
        if chosen == "json" and q.encoding == "pixels":
            payload["originals"] = _pixels(x)
        return images_response(chosen, q.encoding, recon, payload, png=pairs, nrow=2)

    @app.post("/anomaly-score", tags=["model"], summary="-log p(x) bound per image, its percentile among MNIST "
              "test digits, and an anomaly flag", response_model=AnomalyOut, response_model_exclude_none=True,
              openapi_extra={**IMAGE_BODY, "parameters": openapi_parameters(AnomalyQuery)},
              responses={k: ERRORS[k] for k in (406, 413, 415)})
    async def anomaly_score(request: Request) -> Any:
        q = parse_query(AnomalyQuery, request)
        negotiate(request, q.fmt, "json", allowed=("json",))
        engine = engine_for(request, q.model)
        k = q.k or settings.default_k
        if k > settings.max_k:
            raise ApiError(422, "k too large", f"k={k}; the limit is {settings.max_k} (VAE_MAX_K)")
        pct = q.threshold_percentile or settings.default_threshold_percentile
        x = await read_images(request, settings.max_batch, request.app.state.decode, q.preprocess)
        threshold = engine.model.threshold(pct)
        scores = await inference.anomaly_scores(engine, x, k, q.seed, threshold)
        out: dict[str, Any] = {"model": engine.model.name, "k": k, "threshold": threshold,
                               "threshold_percentile": pct, "calibration_k": engine.model.calibration_k}
        if len(scores) == 1:
            out.update(asdict(scores[0]))
        else:
            out["results"] = [asdict(s) for s in scores]
        return JsonResponse(out)

    if settings.bare_endpoint:
        @app.post("/_bare", tags=["ops"], summary="Reads the body, returns {}: the HTTP ceiling for benchmarks",
                  responses={413: ERRORS[413]})
        async def bare(request: Request) -> dict[str, Any]:
            await request.body()
            return {}


app = create_app()
