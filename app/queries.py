"""Each endpoint's query parameters as one pydantic model, validated in one call.

FastAPI's per-parameter machinery costs several times more than one pydantic-core
validation of the whole query (docs/benchmarks.md#serving). The models also write the
OpenAPI parameter list, so the docs and the fuzz tests see exactly what is validated.
Errors keep FastAPI's shape: 422 with `loc` = ["query", name].
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator
from starlette.requests import Request

from app.errors import validation_details
from app.exceptions import InvalidInput
from app.preprocess import Preprocess

MAX_SEED = 2**63

Query = TypeVar("Query", bound="QueryModel")


class QueryModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    model: str | None = Field(None, description="model name from GET /models; default VAE_DEFAULT_MODEL")


class ImageQuery(QueryModel):
    invert: Literal["auto", "true", "false"] = Field("auto", description="auto: invert light-background images")
    fit: bool = Field(True, description="as MNIST was made: fit a larger image into 20x20 keeping its aspect "
                      "ratio, centre any image by mass, thin bold strokes; false: a 28x28 image as it is")

    @field_validator("invert", mode="before")
    @classmethod
    def _boolean_invert(cls, value: Any) -> Any:
        """true/false as JSON booleans too (protocol parameters are JSON values, not query strings)."""
        return str(value).lower() if isinstance(value, bool) else value

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess(self.invert, self.fit)


Encoding = Annotated[Literal["pixels", "base64"], Field(description="JSON output: pixel arrays or base64 PNGs")]
AnyFormat = Annotated[Literal["png", "json"] | None, Field(alias="format", description="png or json; overrides Accept")]
# JSON-only endpoints document only json, but read png too so that it is answered 406, as Accept: image/png is.
JsonFormat = Annotated[Literal["png", "json"] | None,
                       WithJsonSchema({"anyOf": [{"const": "json", "type": "string"}, {"type": "null"}]}),
                       Field(alias="format", description="json, the only format this endpoint answers")]


class EncodeQuery(ImageQuery):
    fmt: JsonFormat = None


class DecodeQuery(QueryModel):
    fmt: AnyFormat = None
    encoding: Encoding = "pixels"


class SampleQuery(DecodeQuery):
    n: int = Field(16, ge=1, description="number of images")
    seed: int | None = Field(None, ge=0, lt=MAX_SEED, description="same seed, same images")
    temperature: float | None = Field(None, gt=0, le=10, allow_inf_nan=False,
                                      description="z ~ N(0, T² I); default 1, or 0.8 with digit")
    digit: int | None = Field(None, ge=0, le=9, description="draw this digit: z from its Gaussian in the model's "
                              "latent mixture, N(m, T² Σ), instead of N(0, T² I)")


class ReconstructQuery(ImageQuery):
    fmt: AnyFormat = None
    encoding: Encoding = "pixels"


class InterpolateQuery(ImageQuery):
    fmt: AnyFormat = None
    encoding: Encoding = "pixels"
    steps: int = Field(8, ge=2, description="points on the path, both ends included (at most VAE_MAX_SAMPLES)")
    path: Literal["slerp", "linear"] = Field("slerp", description="slerp: along the great-circle arc, which keeps "
                                             "the norm where N(0, I) has its mass; linear: the straight line")


class SimilarQuery(ImageQuery):
    fmt: AnyFormat = None
    k: int = Field(8, ge=1, description="how many neighbours (at most VAE_MAX_NEIGHBOURS)")


class AnomalyQuery(ImageQuery):
    fmt: AnyFormat = None
    method: str | None = Field(None, max_length=64, description="score method: the model's default (GET /models: "
                               "anomaly_score) or bound, the plain -log p(x)")
    k: int | None = Field(None, ge=1, description="importance samples (default VAE_DEFAULT_K)")
    threshold_percentile: float | None = Field(None, gt=0, lt=100, allow_inf_nan=False,
                                               description="default VAE_DEFAULT_THRESHOLD_PERCENTILE")
    seed: int = Field(0, ge=0, lt=MAX_SEED, description="noise seed; fixed so equal images score equally")


_defaults: dict[type[QueryModel], QueryModel] = {}


def parse_query(model: type[Query], request: Request) -> Query:
    if not request.scope["query_string"]:  # the common case: every default, validated once
        return default_query(model)
    try:
        return model.model_validate(dict(request.query_params))
    except ValidationError as e:
        details = validation_details(e.errors())
        for d in details:
            d["loc"] = ["query", *d["loc"]]
        raise InvalidInput(details) from e


def parse_parameters(model: type[Query], parameters: dict[str, Any]) -> Query:
    """The same fields from an Open Inference Protocol request's `parameters` (JSON values; others
    that clients add, such as binary_data_output, are ignored): one definition of each limit."""
    if not parameters:
        return default_query(model)
    try:
        return model.model_validate(parameters)
    except ValidationError as e:
        details = validation_details(e.errors())
        for d in details:
            d["loc"] = ["parameters", *d["loc"]]
        raise InvalidInput(details) from e


def default_query(model: type[Query]) -> Query:
    if model not in _defaults:
        _defaults[model] = model()
    return _defaults[model]  # type: ignore[return-value]


def openapi_parameters(model: type[QueryModel]) -> list[dict[str, Any]]:
    """The OpenAPI `parameters` FastAPI would write had each field been a Query(...) argument."""
    schema = model.model_json_schema(by_alias=True)
    required = set(schema.get("required", ()))
    params = []
    for name, prop in schema["properties"].items():
        param: dict[str, Any] = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if "description" in prop:
            param["description"] = prop["description"]
        params.append(param)
    return params
