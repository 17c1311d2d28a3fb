"""Request and response bodies, and the OpenAPI descriptions of the hand-parsed ones.

The image and latent bodies are parsed by hand (app/inputs.py): one endpoint takes raw
bytes, multipart or JSON, which no single FastAPI body parameter expresses. Their
schemas are added to the OpenAPI document by app/main.py.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, Field

IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "One image as the raw body (any format Pillow reads), one or more multipart fields "
        "named `file`, or JSON with base64 `images` or 28x28 `pixels` in [0, 1].",
        "content": {
            # octet-stream first: generated clients (openapi-python-client) take it, and skip image/*.
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["file"],
                }
            },
            "application/json": {
                "schema": {"$ref": "#/components/schemas/ImagesIn"},
                "example": {"pixels": [[[0.0] * 28] * 28]},
            },
        },
    }
}

PNG_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": {"$ref": "#/components/schemas/ImagesOut"}}},
          "description": "PNG (default), or JSON with format=json / Accept: application/json"},
}

# /anomaly-score: JSON by default, a picture of why on request.
EXPLAINED_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/AnomalyOut"}},
                      "image/png": {"schema": {"type": "string", "format": "binary"}}},
          "description": "JSON (default), or with format=png / Accept: image/png one picture row per image: "
                         "the input as seen, its reconstruction, the per-pixel -log p(x_i|z) and the score"},
}

# /similar: JSON by default, a grid of the neighbours on request; /interpolate: a strip by default.
SIMILAR_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/SimilarOut"}},
                      "image/png": {"schema": {"type": "string", "format": "binary"}}},
          "description": "JSON (default), or with format=png / Accept: image/png a row per image: the image as "
                         "seen, then its neighbours, nearest first"},
}
INTERPOLATE_RESPONSE: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                      "application/json": {"schema": {"$ref": "#/components/schemas/InterpolateOut"}}},
          "description": "one PNG strip, first to last (default), or JSON with format=json / Accept: "
                         "application/json"},
}


Pixel = Annotated[float, Field(ge=0.0, le=1.0, strict=True)]  # NaN fails both bounds; strict: no true, no "0.5"
Row = Annotated[list[Pixel], Field(min_length=28, max_length=28)]
Grid = Annotated[list[Row], Field(min_length=28, max_length=28)]


class ImagesIn(BaseModel):
    """JSON body: base64-encoded image files, or 28x28 pixel arrays in [0, 1] (white digit on black)."""

    images: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="base64 of PNG/JPEG/... files", min_length=1)
    pixels: list[Grid] | None = Field(None, description="28x28 floats in [0, 1] per image", min_length=1)


class ErrorOut(BaseModel):
    error: str = Field(examples=["image too large"])
    detail: Any = Field(None, examples=["100000x100000 pixels; the limit is 16000000 pixels"])


# Errors are JSON whatever the endpoint answers on success: the content is spelled out (a "model" key
# would put the schema under the route's own media type, image/png for the image endpoints).
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorOut"}}}}
    for code, text in {
        400: "malformed request", 404: "unknown model", 406: "format not available", 413: "over a size limit",
        415: "unsupported media type or undecodable image", 422: "invalid values or shapes",
        503: "not ready, or overloaded (Retry-After)", 504: "compute timeout",
    }.items()
}


class Latent(BaseModel):
    mu: list[float]
    logvar: list[float]


class EncodeOut(BaseModel):
    model: str = Field(examples=["vae"])
    latent_dim: int = Field(examples=[32])
    mu: list[float] | None = None
    logvar: list[float] | None = None
    results: list[Latent] | None = Field(None, description="one entry per image when a batch was sent")


class LatentMapOut(BaseModel):
    data: str = Field(description="what was encoded", examples=["MNIST test set, posterior means"])
    n: int = Field(description="number of points", examples=[10000])
    extent: list[float] = Field(description="[x_min, x_max, y_min, y_max]: where the means lie (middle 99.8%, "
                                "padded by a tenth)", examples=[[-4.6, 3.9, -4.4, 5.3]])
    x: list[float] = Field(description="z[0] of each image's posterior mean")
    y: list[float] = Field(description="z[1] of each image's posterior mean")
    label: list[int] = Field(description="each image's digit")


Z_LIMIT = 1e4  # |z| beyond this is no latent a Gaussian prior produces; it only makes the decoder overflow
LatentValue = Annotated[float, Field(ge=-Z_LIMIT, le=Z_LIMIT, strict=True)]  # NaN and inf fail the bounds


class DecodeIn(BaseModel):
    z: list[Annotated[list[LatentValue], Field(min_length=1)]] = Field(
        min_length=1, description="latent vectors, each of the model's latent_dim", examples=[[[0.0, 0.0]]])


class InterpolateIn(ImagesIn):
    """JSON body of POST /interpolate: the two ends, as two images (base64 files or pixel arrays) or as two
    latent vectors."""

    z: list[Annotated[list[LatentValue], Field(min_length=1)]] | None = Field(
        None, min_length=2, max_length=2, description="two latent vectors, each of the model's latent_dim")


class InterpolateOut(BaseModel):
    model: str
    path: str = Field(description="slerp or linear")
    z: list[list[float]] = Field(description="the points on the path, first to last")
    images: list[list[list[float]]] | None = Field(None, description="28x28 pixel arrays (encoding=pixels)")
    png_base64: list[str] | None = Field(None, description="one PNG per point (encoding=base64)")


class Neighbour(BaseModel):
    index: int = Field(description="row of the MNIST training set (0-59999), as torchvision's MNIST(train=True) "
                       "and the IDX file order it")
    label: int = Field(description="its digit")
    distance: float = Field(description="Euclidean distance between the posterior means, latent units")


class NeighboursOfOne(BaseModel):
    neighbours: list[Neighbour]


class SimilarOut(BaseModel):
    model: str
    k: int
    neighbours: list[Neighbour] | None = Field(None, description="nearest first (one image sent)")
    results: list[NeighboursOfOne] | None = Field(None, description="one entry per image when a batch was sent")


class ImagesOut(BaseModel):
    model: str
    images: list[list[list[float]]] | None = Field(None, description="28x28 pixel arrays (encoding=pixels)")
    png_base64: list[str] | None = Field(None, description="one PNG per image (encoding=base64)")
    z: list[list[float]] | None = Field(None, description="the latents used (sample)")
    seed: int | None = Field(None, description="seed that reproduces this sample")
    originals: list[list[list[float]]] | None = Field(None, description="the preprocessed inputs (reconstruct)")


class ScoreOut(BaseModel):
    score: float = Field(description="the method's anomaly score; higher = less like the training digits (bound: "
                         "-log p(x) upper bound in nats, IWAE with k samples)")
    percentile: float | None = Field(description="percentile of the score among MNIST test images")
    is_anomaly: bool | None


class AnomalyOut(BaseModel):
    model: str
    method: str = Field(description="the score method used (GET /models lists each model's)")
    k: int
    threshold: float | None = Field(description="score at threshold_percentile of the calibration set")
    threshold_percentile: float
    calibration_k: int | None
    score: float | None = None
    percentile: float | None = None
    is_anomaly: bool | None = None
    results: list[ScoreOut] | None = None


# --- Open Inference Protocol (app/api/routes/v2.py) ----------------------------------------


class ProtocolErrorOut(BaseModel):
    error: str = Field(examples=["unknown model: 'vae.nope'; served: vae.encode, vae.decode, ..."])


class ResponseOutput(BaseModel):
    name: str
    datatype: str
    shape: list[int]
    parameters: dict[str, Any] | None = Field(None, description="binary_data_size when the data follows the "
                                              "JSON document")
    data: list[Any] | None = Field(None, description="row-major, flat")


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


PROTOCOL_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"description": text,
           "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ProtocolErrorOut"}}}}
    for code, text in {400: "bad request", 404: "unknown model or version", 413: "body over VAE_MAX_BODY_BYTES",
                       503: "not ready, or overloaded (Retry-After)", 504: "compute timeout"}.items()
}
_BINARY = {"schema": {"type": "string", "format": "binary"}}
PROTOCOL_INFER_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"$ref": "#/components/schemas/InferenceRequest"}, "example": {
        "inputs": [{"name": "images_uint8", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}},
    "application/octet-stream": _BINARY}}}
PROTOCOL_INFER_RESPONSE: dict[int | str, dict[str, Any]] = {200: {
    "description": "JSON, or (binary outputs asked for) the JSON document then the outputs' bytes, "
    "Inference-Header-Content-Length giving the document's length",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/InferenceResponse"}},
                "application/octet-stream": _BINARY}}}


class RepositoryIndexIn(BaseModel):
    ready: bool = Field(False, description="only the model versions that are ready")


class RepositoryModel(BaseModel):
    name: str
    version: str
    state: str = Field(description="READY or UNAVAILABLE")
    reason: str = Field(description="why it is unavailable (unloaded, or the file's fault), else empty")


class RepositoryLoadOut(BaseModel):
    name: str
    load: bool = True
    versions: list[str] = Field(description="the versions now served, oldest first; requests naming none get the "
                                "last")


class RepositoryUnloadOut(BaseModel):
    name: str
    unload: bool = True
