"""What every model route opens with, written once: its query, the answer's format, its model.

`Call` also reads the request's images, with the query's preprocessing and the model's
limits. Each model route awaits its opening as its first line instead of declaring it
with `Depends`: measured in-process (docs/benchmarks.md#layout), FastAPI's dependency
machinery added 10-20 µs to every /encode, about 3% of its cost, where a plain awaited
function adds nothing measurable. Not-hot routes use ordinary dependencies (`SettingsDep`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Generic, TypeVar

from fastapi import Depends, Request
from fastapi.routing import APIRoute
from torch import Tensor

from app import tracing
from app.exceptions import Unavailable, UnknownModel
from app.formats import Format, negotiate
from app.inference import Engine
from app.inputs import ImageReader, read_ends, read_images
from app.queries import (
    AnomalyQuery,
    DecodeQuery,
    EncodeQuery,
    ImageQuery,
    InterpolateQuery,
    QueryModel,
    ReconstructQuery,
    SampleQuery,
    SimilarQuery,
    parse_query,
)
from app.repository import Repository
from app.settings import Settings

Q = TypeVar("Q", bound=QueryModel)


@dataclass(frozen=True, slots=True)
class Call(Generic[Q]):
    request: Request
    query: Q
    fmt: Format
    engine: Engine

    async def images(self) -> Tensor:
        """The request's images as [B, 1, 28, 28], preprocessed as the query says."""
        assert isinstance(self.query, ImageQuery)
        reader: ImageReader = self.request.app.state.image_reader
        if tracing.tracer is None:
            return await read_images(self.request, self.engine.limits, reader, self.query.preprocess)
        with tracing.span("read body"):
            await self.request.body()  # kept by the request for what reads it next
        with tracing.span("decode images"):
            return await read_images(self.request, self.engine.limits, reader, self.query.preprocess)

    async def ends(self) -> Tensor | list[list[float]]:
        """POST /interpolate's two ends: images, preprocessed as the query says, or latent vectors."""
        assert isinstance(self.query, ImageQuery)
        reader: ImageReader = self.request.app.state.image_reader
        return await read_ends(self.request, self.engine.limits, reader, self.query.preprocess)


def operation_id(route: APIRoute) -> str:
    """OpenAPI operationId = the route function's name (`encode`, `anomaly_score`): what generated
    clients name their functions after."""
    return route.name


def not_ready(request: Request) -> Unavailable | None:
    """Why the service should get no new traffic now (/readyz, /v2/health/ready), or None."""
    state = request.app.state
    if not state.ready:
        return Unavailable("models are loading")
    if state.drain.draining:
        return Unavailable("shutting down (SIGTERM): requests on open connections are still answered for "
                           "VAE_DRAIN_DELAY_S")
    return None


def repository_of(request: Request) -> Repository:
    """The served models, once they are all loaded (503 before)."""
    if not request.app.state.ready:
        raise Unavailable("models are still loading")
    return request.app.state.repository


def engine_for(request: Request, name: str | None) -> Engine:
    """The newest version of the named model (the default model when none is named)."""
    engines = repository_of(request).engines
    name = name or request.app.state.settings.default_model
    if name not in engines:
        raise UnknownModel(f"{name!r}; available: {sorted(engines)}")
    request.state.model = name  # for the access log
    return engines[name]


def model_call(query: type[Q], default: Format, allowed: tuple[Format, ...] = ("png", "json")
               ) -> Callable[[Request], Awaitable[Call[Q]]]:
    """The opening of a model route whose query is `query` and whose default answer is `default`."""

    async def opening(request: Request) -> Call[Q]:
        q = parse_query(query, request)
        fmt = negotiate(request, q.fmt, default, allowed)  # type: ignore[attr-defined]
        return Call(request, q, fmt, engine_for(request, q.model))

    return opening


async def settings_of(request: Request) -> Settings:  # async: FastAPI runs sync dependencies on a thread
    return request.app.state.settings


SettingsDep = Annotated[Settings, Depends(settings_of)]
open_encode = model_call(EncodeQuery, "json", ("json",))
open_decode = model_call(DecodeQuery, "png")
open_sample = model_call(SampleQuery, "png")
open_reconstruct = model_call(ReconstructQuery, "png")
open_anomaly_score = model_call(AnomalyQuery, "json")
open_interpolate = model_call(InterpolateQuery, "png")
open_similar = model_call(SimilarQuery, "json")
