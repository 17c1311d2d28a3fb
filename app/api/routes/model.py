"""The model endpoints: HTTP in, HTTP out. The work is the Engine's (app/inference.py)."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from app import responses
from app.api import deps
from app.api.deps import operation_id
from app.exceptions import UnsupportedMediaType
from app.inputs import max_json_values, parse_body
from app.queries import (
    AnomalyQuery,
    DecodeQuery,
    EncodeQuery,
    InterpolateQuery,
    ReconstructQuery,
    SampleQuery,
    SimilarQuery,
    openapi_parameters,
)
from app.responses import JsonResponse, PngResponse
from app.schemas import (
    ERRORS,
    EXPLAINED_RESPONSE,
    IMAGE_BODY,
    INTERPOLATE_RESPONSE,
    PNG_RESPONSE,
    SIMILAR_RESPONSE,
    AnomalyOut,
    DecodeIn,
    EncodeOut,
    SimilarOut,
)

router = APIRouter(tags=["model"], responses={k: ERRORS[k] for k in (400, 404, 422, 503, 504)},
                   generate_unique_id_function=operation_id)
IMAGE_ERRORS = {k: ERRORS[k] for k in (406, 413, 415)}


@router.post("/encode", summary="Image(s) to the posterior mean and log-variance", response_class=JsonResponse,
             response_model=EncodeOut, response_model_exclude_none=True, responses=IMAGE_ERRORS,
             openapi_extra={**IMAGE_BODY, "parameters": openapi_parameters(EncodeQuery)})
async def encode(request: Request) -> Response:
    call = await deps.open_encode(request)
    x = await call.images()
    mu, logvar = await call.engine.encode(x)
    return responses.encoded(call.engine.model.name, call.engine.model.latent_dim, mu, logvar)


@router.post("/decode", summary="Latent vectors to images (PNG grid or JSON)", response_class=PngResponse,
             responses={**PNG_RESPONSE, **IMAGE_ERRORS},
             openapi_extra={"parameters": openapi_parameters(DecodeQuery), "requestBody": {
                 "required": True, "content": {"application/json": {
                     "schema": {"$ref": "#/components/schemas/DecodeIn"}, "example": {"z": [[0.0, 0.0]]}}}}})
async def decode(request: Request) -> Response:
    call = await deps.open_decode(request)
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise UnsupportedMediaType("send application/json: {\"z\": [[...], ...]}")
    limits, d = call.engine.limits, call.engine.model.latent_dim
    body = await parse_body(DecodeIn, await request.body(), max_json_values(limits.max_batch, d),
                            f"more than {limits.max_batch} vectors of {d} values (VAE_MAX_BATCH)")
    images = await call.engine.decode(body.z)
    return responses.images(call.fmt, call.query.encoding, images, {"model": call.engine.model.name})


@router.get("/sample", summary="n images from z ~ N(0, T² I)", response_class=PngResponse,
            responses={**PNG_RESPONSE, **{k: ERRORS[k] for k in (406, 413)}},
            openapi_extra={"parameters": openapi_parameters(SampleQuery)})
async def sample(request: Request) -> Response:
    call = await deps.open_sample(request)
    q = call.query
    drawn = await call.engine.sample(q.n, q.seed, q.temperature, q.digit)
    return responses.sampled(call.fmt, q.encoding, call.engine.model.name, drawn)


@router.post("/interpolate", summary="The decoded path between two images (or two latent vectors): a PNG strip "
             "or JSON", response_class=PngResponse, responses={**INTERPOLATE_RESPONSE, **IMAGE_ERRORS},
             openapi_extra={"parameters": openapi_parameters(InterpolateQuery), "requestBody": {
                 "required": True, "content": {
                     "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
                         "file": {"type": "array", "items": {"type": "string", "format": "binary"},
                                  "minItems": 2, "maxItems": 2, "description": "two image files"}}}},
                     "application/json": {"schema": {"$ref": "#/components/schemas/InterpolateIn"},
                                          "example": {"z": [[0.0, 0.0], [1.0, 1.0]]}}}}})
async def interpolate(request: Request) -> Response:
    call = await deps.open_interpolate(request)
    q = call.query
    z, images = await call.engine.interpolate(await call.ends(), q.steps, q.path)
    return responses.interpolated(call.fmt, q.encoding, call.engine.model.name, q.path, z, images)


@router.post("/similar", summary="The k MNIST training digits nearest to each image in latent space (JSON), or a "
             "PNG grid of them", response_class=JsonResponse, response_model=SimilarOut,
             response_model_exclude_none=True, responses={**SIMILAR_RESPONSE, **IMAGE_ERRORS},
             openapi_extra={**IMAGE_BODY, "parameters": openapi_parameters(SimilarQuery)})
async def similar(request: Request) -> Response:
    call = await deps.open_similar(request)
    x = await call.images()
    found = await call.engine.similar(x, call.query.k)
    index = call.engine.model.index
    assert index is not None  # similar() refuses a model without one
    return responses.neighbours(call.fmt, call.engine.model.name, x, found, index)


@router.post("/reconstruct", summary="Image(s) to reconstruction(s): PNG rows of original | reconstruction, or JSON",
             response_class=PngResponse, responses={**PNG_RESPONSE, **IMAGE_ERRORS},
             openapi_extra={**IMAGE_BODY, "parameters": openapi_parameters(ReconstructQuery)})
async def reconstruct(request: Request) -> Response:
    call = await deps.open_reconstruct(request)
    x = await call.images()
    recon = await call.engine.reconstruct(x)
    return responses.reconstructed(call.fmt, call.query.encoding, call.engine.model.name, x, recon)


@router.post("/anomaly-score", summary="Anomaly score per image, its percentile among held-out MNIST digits, and "
             "an anomaly flag (JSON), or a picture of why (PNG)", response_class=JsonResponse,
             response_model=AnomalyOut, response_model_exclude_none=True,
             responses={**EXPLAINED_RESPONSE, **IMAGE_ERRORS},
             openapi_extra={**IMAGE_BODY, "parameters": openapi_parameters(AnomalyQuery)})
async def anomaly_score(request: Request) -> Response:
    call = await deps.open_anomaly_score(request)
    q = call.query
    x = await call.images()
    scores = await call.engine.anomaly_scores(x, q.k, q.seed, q.threshold_percentile, q.method)
    if call.fmt == "png":
        return await responses.explained(x, await call.engine.reconstruct(x), scores)
    return responses.scored(call.engine.model.name, scores)
