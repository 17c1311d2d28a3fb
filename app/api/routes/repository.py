"""The Open Inference Protocol's model repository extension, REST side: HTTP in, HTTP out.

What it changes and how is app/repository.py's. A model is named as the repository knows it
(`vae`); a protocol model name (`vae.encode`) stands for its artifact. Errors take the
protocol's shape, as every /v2 route's.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError

from app.api.deps import operation_id, repository_of
from app.errors import validation_details
from app.exceptions import InvalidInput
from app.protocol import catalog
from app.schemas import (
    PROTOCOL_ERRORS,
    RepositoryIndexIn,
    RepositoryLoadOut,
    RepositoryModel,
    RepositoryUnloadOut,
)

router = APIRouter(tags=["model repository"], generate_unique_id_function=operation_id, responses=PROTOCOL_ERRORS)


@router.post("/v2/repository/index", summary="Every model version in the models folder: READY, or UNAVAILABLE "
             "and why (unloaded, or the fault of a file that was refused); body optional: {\"ready\": true} lists "
             "the ready ones only", openapi_extra={"requestBody": {"required": False, "content": {
                 "application/json": {"schema": {"$ref": "#/components/schemas/RepositoryIndexIn"}}}}})
async def repository_index(request: Request) -> list[RepositoryModel]:
    body = await request.body()
    try:
        ready = RepositoryIndexIn.model_validate_json(body).ready if body.strip() else False
    except ValidationError as e:
        raise InvalidInput(validation_details(e.errors())) from e
    return [RepositoryModel(**row) for row in repository_of(request).index(ready)]


@router.post("/v2/repository/models/{model_name}/load", summary="Load, or load again, every version of a model from "
             "the models folder; each file must pass the start-up checks, else nothing changes (400 naming the "
             "file and its fault) and the versions already served keep serving")
async def repository_load(request: Request, model_name: str) -> RepositoryLoadOut:
    name = catalog.artifact_of(model_name)
    versions = await repository_of(request).load(name)
    request.state.model = name  # only names served become label values
    return RepositoryLoadOut(name=name, versions=versions)


@router.post("/v2/repository/models/{model_name}/unload", summary="Stop serving a model (every version); answers "
             "once its requests in progress are answered. It stays unloaded, new files included, until loaded")
async def repository_unload(request: Request, model_name: str) -> RepositoryUnloadOut:
    name = catalog.artifact_of(model_name)
    await repository_of(request).unload(name)
    request.state.model = name
    return RepositoryUnloadOut(name=name)
