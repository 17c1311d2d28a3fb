"""The Open Inference Protocol v2, REST side (kserve/open-inference-protocol): HTTP in, HTTP out.

Health, metadata and inference for the protocol models of app/protocol/catalog.py, with the
binary tensor data extension (app/protocol/codec.py). Errors take the protocol's shape
({"error": "..."}), chosen by path in app/errors.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from app import tracing
from app.api.deps import not_ready, operation_id, repository_of
from app.inference import Engine
from app.inputs import max_json_values, off_the_loop_if_large
from app.protocol import catalog, codec
from app.schemas import PROTOCOL_ERRORS, PROTOCOL_INFER_BODY, PROTOCOL_INFER_RESPONSE

router = APIRouter(tags=["open inference protocol"], generate_unique_id_function=operation_id,
                   responses=PROTOCOL_ERRORS)
VERSIONED = "/versions/{model_version}"


@router.get("/v2", summary="Server metadata: name, version, the protocol extensions supported")
async def server_metadata(request: Request) -> dict[str, Any]:
    return {"name": catalog.SERVER_NAME, "version": request.app.version, "extensions": catalog.EXTENSIONS}


@router.get("/v2/health/live", summary="The server is alive")
async def server_live() -> dict[str, bool]:
    return {"live": True}


@router.get("/v2/health/ready", summary="200 once every model is loaded and warmed up; 503 before, and while "
            "draining after SIGTERM (as KServe's own server answers; clients read any status but 200 as not ready)")
async def server_ready(request: Request) -> JSONResponse:
    ready = not_ready(request) is None
    return JSONResponse({"ready": ready}, status_code=200 if ready else 503)


def _model(request: Request) -> tuple[str, Engine, catalog.Capability]:
    name = request.path_params["model_name"]
    engine, capability = catalog.resolve(repository_of(request), name, request.path_params.get("model_version"))
    request.state.model = name  # for the access log and the metrics' model label
    return name, engine, capability


# The path parameters are read from request.path_params (as every model route reads its query
# itself, app/api/deps.py says why) and documented here.
def _path_parameters(versioned: bool) -> list[dict[str, Any]]:
    names = ["model_name", "model_version"] if versioned else ["model_name"]
    return [{"name": n, "in": "path", "required": True, "schema": {"type": "string"}} for n in names]


async def model_metadata(request: Request) -> dict[str, Any]:
    name, engine, capability = _model(request)
    return catalog.metadata(name, engine, capability, repository_of(request).versions_of(engine.model.name))


async def model_ready(request: Request) -> dict[str, Any]:
    name, _, _ = _model(request)  # 404 unknown, 503 while loading
    return {"name": name, "ready": True}


async def infer(request: Request) -> Response:
    name, engine, capability = _model(request)
    with tracing.span("read body"):
        body = await request.body()
    with tracing.span("decode tensors"):
        inference, tensors = await off_the_loop_if_large(codec.read_request, body,
                                                         request.headers.get(codec.HEADER_LENGTH),
                                                         max_json_values(engine.limits.max_batch, 28 * 28))
    outputs, parameters = await capability.run(engine, tensors, inference.parameters, request.app.state.image_reader)
    with tracing.span("encode answer"):
        body, header_length = codec.write_response(name, engine.model.version, inference, outputs, parameters)
    if header_length is None:
        return Response(body, media_type="application/json")
    return Response(body, media_type="application/octet-stream",
                    headers={"Inference-Header-Content-Length": str(header_length)})


for versioned in (False, True):
    base = "/v2/models/{model_name}" + (VERSIONED if versioned else "")
    prefix = "model_version_" if versioned else "model_"
    params = {"parameters": _path_parameters(versioned)}
    router.add_api_route(base, model_metadata, methods=["GET"], name=f"{prefix}metadata", openapi_extra=params,
                         summary="A model's metadata: versions, platform, its input and output tensors")
    router.add_api_route(f"{base}/ready", model_ready, methods=["GET"], name=f"{prefix}ready", openapi_extra=params,
                         summary="200 when the model is ready to infer")
    router.add_api_route(f"{base}/infer", infer, methods=["POST"], name=f"{prefix}infer", response_class=Response,
                         summary="Inference: JSON tensors, or binary tensors after the JSON document "
                         "(Inference-Header-Content-Length)", responses=PROTOCOL_INFER_RESPONSE,
                         openapi_extra={**PROTOCOL_INFER_BODY, **params})
