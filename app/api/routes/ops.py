"""Operations endpoints: liveness, readiness, what is served. Never refused for load."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app import supervisor
from app.api.deps import SettingsDep, engine_for, not_ready, operation_id
from app.errors import service_error_response
from app.exceptions import NoLatentMap
from app.repository import Repository
from app.schemas import ERRORS, LatentMapOut

router = APIRouter(tags=["ops"], generate_unique_id_function=operation_id)


@router.get("/healthz", summary="Process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 once every model is loaded and warmed up, 503 before and while draining after "
            "SIGTERM; with several workers, also how many are running and which fail to start",
            responses={503: ERRORS[503]})
async def readyz(request: Request) -> JSONResponse:
    reason = not_ready(request)
    if reason is not None:
        return service_error_response(reason)
    answer: dict[str, Any] = {"status": "ready", "models": sorted(request.app.state.repository.engines)}
    workers = supervisor.status()  # VAE_WORKERS > 1: this worker serves; are the others?
    if workers is not None:
        answer["workers"] = workers
    return JSONResponse(answer)


@router.get("/models", summary="Each model's meta.json, the device it runs on, and batching counts since start "
            "(requests and forward passes per method, in the worker process that answered)")
async def models(request: Request, settings: SettingsDep) -> dict[str, Any]:
    repository: Repository | None = request.app.state.repository  # None while loading
    engines = repository.engines if repository is not None else {}
    return {"default": settings.default_model, "worker_pid": os.getpid(),
            "models": [{**e.model.describe(), "versions": repository.versions_of(name), "batching": e.stats()}
                       for name, e in engines.items() if repository is not None]}


@router.get("/models/{name}/latent-map", summary="A 2-D model's map of the MNIST test set: each image's posterior "
            "mean (x, y) and digit (label), and the extent to draw and decode over; read from the artifact, drawn "
            "by the page at /", response_model=LatentMapOut, responses={404: ERRORS[404], 503: ERRORS[503]})
async def latent_map(request: Request, name: str) -> Response:
    lmap = engine_for(request, name).model.latent_map
    if lmap is None:
        raise NoLatentMap(f"model {name!r} has none: only 2-D models carry one (vae-latent-map adds it)")
    headers = {"ETag": lmap.etag, "Cache-Control": "no-cache", "Vary": "Accept-Encoding"}
    if lmap.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    if "gzip" in request.headers.get("accept-encoding", ""):
        return Response(lmap.gzipped, media_type="application/json", headers={**headers, "Content-Encoding": "gzip"})
    return Response(lmap.body, media_type="application/json", headers=headers)


metrics_router = APIRouter(tags=["ops"], generate_unique_id_function=operation_id)


@metrics_router.get("/metrics", summary="Prometheus metrics, text exposition format (README: what each one means)",
                    response_class=PlainTextResponse,
                    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
async def metrics(request: Request) -> Response:
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, media_type=content_type)


bare_router = APIRouter(tags=["ops"], generate_unique_id_function=operation_id)


@bare_router.post("/_bare", summary="Reads the body, returns {}: the HTTP ceiling for benchmarks",
                  responses={413: ERRORS[413]})
async def bare(request: Request) -> dict[str, Any]:
    await request.body()
    return {}
