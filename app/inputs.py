"""Reading images out of a request: raw body, multipart `file` fields, or JSON.

Every accepted form ends as one float32 tensor [B, 1, 28, 28]; every rejected one as a
domain error (app/exceptions.py) that app/errors.py turns into the status a client can
act on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.batching import LoopTurnGroup
from app.decoders import DecoderPool
from app.errors import validation_details
from app.exceptions import (
    BatchTooLarge,
    InvalidInput,
    MalformedRequest,
    ServiceError,
    UnsupportedMediaType,
)
from app.imaging import fast_gray28_many, grays_to_tensor, is_fast_png, pixels_to_tensor
from app.inference import Limits
from app.preprocess import PngHeader, Preprocess, check_pixels, png_header
from app.schemas import ImagesIn, InterpolateIn

Body = TypeVar("Body", bound=BaseModel)
Parsed = TypeVar("Parsed")


# JSON bodies up to this size are parsed on the event loop (a 28x28 `pixels` image is 2-10 KB, its
# parse tens of microseconds); larger ones on a thread, so that the loop keeps answering meanwhile.
JSON_INLINE_BYTES = 64 * 1024


def max_json_values(rows: int, values_per_row: int) -> int:
    """The most values (numbers, strings, members) a JSON body of `rows` rows of `values_per_row`
    may hold, with room for the document's own keys: the bound `parse_body` checks before parsing."""
    return rows * (values_per_row + 1) + 64


async def off_the_loop_if_large(parse: Callable[..., Parsed], body: bytes, *args: Any) -> Parsed:
    """`parse(body, *args)`: on the event loop for a small body, on a thread for a large one."""
    if len(body) <= JSON_INLINE_BYTES:
        return parse(body, *args)
    return await asyncio.to_thread(parse, body, *args)


async def parse_body(model: type[Body], body: bytes, max_values: int, too_many: str) -> Body:
    """A JSON request body into `model`: 400 when it is not JSON (or nested deeper than the parser's
    limit of 200), 422 when it does not fit, 413 when it holds more than `max_values` values.

    The count comes first and costs one pass over the bytes in C: every value after an array's or
    object's first is preceded by a comma, so commas + 1 bounds the values from above. A body of
    millions of numbers is refused in milliseconds instead of being built in full and then found
    over the batch limit (seconds of a blocked event loop)."""
    if body.count(b",") >= max_values:
        raise BatchTooLarge(f"the JSON body holds more than {max_values} values: {too_many}")
    return await off_the_loop_if_large(validate_json, body, model)


def validate_json(body: bytes, model: type[Body]) -> Body:
    """pydantic-core's parser (jiter), straight into the model: no intermediate Python objects, and a
    nesting limit (an array 100,000 deep is a 400, where the stdlib's parser hit a RecursionError)."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        invalid = [err for err in e.errors() if err["type"] == "json_invalid"]
        if invalid:
            raise MalformedRequest(invalid[0]["ctx"]["error"] if "ctx" in invalid[0] else invalid[0]["msg"],
                                   error="malformed JSON") from e
        raise InvalidInput(validation_details(e.errors())) from e


class ImageReader:
    """Image files -> [B, 1, 28, 28], without holding up the event loop or anybody else.

    PNGs that are already 28x28 8-bit grey and small (what MNIST tooling sends;
    imaging.is_fast_png) decode in tens of microseconds: they are decoded on the event
    loop, every request's files queued in the same loop turn back to back
    (batching.LoopTurnGroup says why). Anything else, from a phone photo to a batch of page
    scans, can take from milliseconds to seconds, and a hostile file for ever: it is
    decoded in a decoder process (app/decoders.py) that is stopped at the request's
    deadline (504), so health checks and other requests keep being answered meanwhile.
    """

    def __init__(self, max_pixels: int, timeout_s: float, processes: int | None = None) -> None:
        self.max_pixels = max_pixels
        self.decoders = DecoderPool(max_pixels, timeout_s, processes)
        self.small = LoopTurnGroup(many=self._small_many)

    def _small_many(self, calls: list[tuple[list[bytes], list[PngHeader | None], Preprocess]]
                    ) -> list[torch.Tensor | Exception]:
        """Every fast PNG of one loop turn's requests decoded and screened together; each request's
        images as one tensor, or the first failure among them."""
        files = [(b, h, prep) for blobs, headers, prep in calls for b, h in zip(blobs, headers, strict=True)]
        grays = iter(fast_gray28_many(files, self.max_pixels))
        answers: list[torch.Tensor | Exception] = []
        for blobs, _, _ in calls:
            mine = [next(grays) for _ in blobs]
            failed = next((g for g in mine if isinstance(g, Exception)), None)
            answers.append(failed if failed is not None else grays_to_tensor(mine))  # type: ignore[arg-type]
        return answers

    async def __call__(self, blobs: list[bytes], prep: Preprocess) -> torch.Tensor:
        headers = [png_header(b) for b in blobs]  # read once: routing, then the pixel limit and the decoder
        if all(is_fast_png(b, h) for b, h in zip(blobs, headers, strict=True)):
            return await self.small(blobs, headers, prep)
        for h in headers:  # a PNG over the pixel limit is refused here, before any process is asked
            if h is not None:
                check_pixels(h[0], h[1], self.max_pixels)
        grays = await self.decoders.decode(blobs, prep)
        return grays_to_tensor(list(grays))

    def start(self) -> asyncio.Future[np.ndarray]:
        return self.decoders.start()

    def close(self) -> None:
        self.decoders.close()


async def read_images(request: Request, limits: Limits, reader: ImageReader, prep: Preprocess) -> torch.Tensor:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await reader(await _multipart(request, limits), prep)
    if ctype == "application/json":
        body = await parse_body(ImagesIn, await request.body(), max_json_values(limits.max_batch, 28 * 28),
                                f"more than {limits.max_batch} images of 28x28 pixels (VAE_MAX_BATCH)")
        if (body.images is None) == (body.pixels is None):
            raise InvalidInput("give exactly one of 'images' (base64 files) or 'pixels'")
        return await json_images(body, limits, reader, prep)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await reader([await request.body()], prep)
    raise UnsupportedMediaType(f"got {ctype or 'no Content-Type'}; send image/* or application/octet-stream (raw "
                               "bytes), multipart/form-data with field 'file', or application/json with 'images' "
                               "or 'pixels'")


async def json_images(body: ImagesIn, limits: Limits, reader: ImageReader, prep: Preprocess) -> torch.Tensor:
    """The images of a JSON body that holds `images` or `pixels`."""
    if body.pixels is not None:
        limits.check_batch(len(body.pixels))
        return torch.cat([pixels_to_tensor(p) for p in body.pixels]).unsqueeze(1)
    assert body.images is not None
    limits.check_batch(len(body.images))
    return await reader([_b64(s, i) for i, s in enumerate(body.images)], prep)


async def read_ends(request: Request, limits: Limits, reader: ImageReader, prep: Preprocess
                    ) -> torch.Tensor | list[list[float]]:
    """POST /interpolate's two ends: images in any form `read_images` takes, or JSON `z` (two latent vectors,
    returned as they are; the Engine checks their count and length, and the images' count)."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        return await read_images(request, limits, reader, prep)
    body = await parse_body(InterpolateIn, await request.body(), max_json_values(limits.max_batch, 28 * 28),
                            f"more than {limits.max_batch} images of 28x28 pixels (VAE_MAX_BATCH)")
    if sum(v is not None for v in (body.images, body.pixels, body.z)) != 1:
        raise InvalidInput("give exactly one of 'images' (two base64 files), 'pixels' (two 28x28 arrays) or 'z' "
                           "(two latent vectors)")
    return body.z if body.z is not None else await json_images(body, limits, reader, prep)


async def _multipart(request: Request, limits: Limits) -> list[bytes]:
    max_batch = limits.max_batch
    try:
        form = await request.form(max_files=max_batch + 1, max_fields=max_batch + 16)
    except ServiceError:
        raise  # the body limit, counted while the form streams in: a 413, not a malformed form
    except Exception as e:  # python-multipart / starlette raise several types for malformed or oversize forms
        if "Too many files" in str(e):
            raise BatchTooLarge(f"more than {max_batch} files; the limit is {max_batch} (VAE_MAX_BATCH)") from e
        raise MalformedRequest(str(e), error="malformed multipart body") from e  # too many other fields too
    files = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
    if not files:
        raise InvalidInput("multipart body needs one or more 'file' fields holding images")
    limits.check_batch(len(files))
    return [await f.read() for f in files]


def _b64(s: str, index: int) -> bytes:
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidInput(f"images[{index}] is not valid base64") from e

