"""Reading images out of a request: raw body, multipart `file` fields, or JSON.

Every accepted form ends as one float32 tensor [B, 1, 28, 28]; every rejected one as
an ApiError with the status a client can act on.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import torch
from fastapi import Request
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile

from app.batching import Stage
from app.errors import ApiError, validation_details
from app.imaging import Preprocess, decode_batch, pixels_to_tensor

Body = TypeVar("Body", bound=BaseModel)
Pixel = Annotated[float, Field(ge=0.0, le=1.0)]  # NaN fails both bounds
Row = Annotated[list[Pixel], Field(min_length=28, max_length=28)]
Grid = Annotated[list[Row], Field(min_length=28, max_length=28)]


class ImagesIn(BaseModel):
    """JSON body: base64-encoded image files, or 28x28 pixel arrays in [0, 1] (white digit on black)."""

    images: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="base64 of PNG/JPEG/... files", min_length=1)
    pixels: list[Grid] | None = Field(None, description="28x28 floats in [0, 1] per image", min_length=1)


def parse_body(model: type[Body], body: bytes) -> Body:
    """A JSON request body into `model`: 400 when it is not JSON, 422 when it does not fit."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, "malformed JSON", str(e)) from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ApiError(422, "invalid request", validation_details(e.errors())) from e


Decoder = Callable[[list[bytes], Preprocess], Awaitable[torch.Tensor]]


def decoder(max_pixels: int) -> Decoder:
    """Image files -> [B, 1, 28, 28], every request's files decoded together with the others
    queued in the same event-loop turn (see batching.Stage for why)."""
    return Stage(lambda blobs, prep: decode_batch(blobs, max_pixels, prep))


async def read_images(request: Request, max_batch: int, decode: Decoder, prep: Preprocess) -> torch.Tensor:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await decode(await _multipart(request, max_batch), prep)
    if ctype == "application/json":
        body = parse_body(ImagesIn, await request.body())
        if (body.images is None) == (body.pixels is None):
            raise ApiError(422, "invalid request", "give exactly one of 'images' (base64 files) or 'pixels'")
        if body.pixels is not None:
            _check_batch(len(body.pixels), max_batch)
            return torch.cat([pixels_to_tensor(p) for p in body.pixels]).unsqueeze(1)
        assert body.images is not None
        _check_batch(len(body.images), max_batch)
        return await decode([_b64(s, i) for i, s in enumerate(body.images)], prep)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await decode([await request.body()], prep)
    raise ApiError(415, "unsupported media type",
                   f"got {ctype or 'no Content-Type'}; send image/* (raw bytes), multipart/form-data with field "
                   "'file', or application/json with 'images' or 'pixels'")


async def _multipart(request: Request, max_batch: int) -> list[bytes]:
    try:
        form = await request.form(max_files=max_batch + 1, max_fields=max_batch + 16)
    except Exception as e:  # python-multipart / starlette raise several types for malformed or oversize forms
        status = 413 if "Too many files" in str(e) else 400  # too many other fields: a malformed form
        raise ApiError(status, "malformed multipart body" if status == 400 else "batch too large", str(e)) from e
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise ApiError(422, "invalid request", "multipart body needs one or more 'file' fields holding images")
    _check_batch(len(files), max_batch)
    return [await f.read() for f in files]


def _b64(s: str, index: int) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(422, "invalid request", f"images[{index}] is not valid base64") from e


def _check_batch(n: int, max_batch: int) -> None:
    if n > max_batch:
        raise ApiError(413, "batch too large", f"{n} images; the limit is {max_batch} (VAE_MAX_BATCH)")
