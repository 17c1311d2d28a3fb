"""Operations endpoints: liveness, readiness, what is served. Never refused for load."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from app.api.deps import SettingsDep, not_ready, operation_id
from app.errors import service_error_response
from app.inference import Engine
from app.schemas import ERRORS

router = APIRouter(tags=["ops"], generate_unique_id_function=operation_id)


@router.get("/healthz", summary="Process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 once every model is loaded and warmed up, 503 before and while draining after "
            "SIGTERM",
            responses={503: ERRORS[503]})
async def readyz(request: Request) -> JSONResponse:
    reason = not_ready(request)
    if reason is not None:
        return service_error_response(reason)
    return JSONResponse({"status": "ready", "models": sorted(request.app.state.engines)})


@router.get("/models", summary="Each model's meta.json, the device it runs on, and batching counts since start "
            "(requests and forward passes per method, in the worker process that answered)")
async def models(request: Request, settings: SettingsDep) -> dict[str, Any]:
    engines: dict[str, Engine] = request.app.state.engines
    return {"default": settings.default_model, "worker_pid": os.getpid(),
            "models": [{**e.model.describe(), "batching": e.stats()} for e in engines.values()]}


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
