"""Reading images out of a request: raw body, multipart `file` fields, or JSON.

Every accepted form ends as one float32 tensor [B, 1, 28, 28]; every rejected one as a
domain error (app/exceptions.py) that app/errors.py turns into the status a client can
act on.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.requests import Request

from app.batching import LoopTurnGroup
from app.errors import validation_details
from app.exceptions import (
    BatchTooLarge,
    ComputeTimeout,
    InvalidInput,
    MalformedRequest,
    ServiceError,
    UnsupportedMediaType,
)
from app.imaging import PngHeader, Preprocess, gray28, grays_to_tensor, is_small_gray, pixels_to_tensor, png_header
from app.inference import Limits
from app.schemas import ImagesIn

Body = TypeVar("Body", bound=BaseModel)


def parse_body(model: type[Body], body: bytes) -> Body:
    """A JSON request body into `model`: 400 when it is not JSON, 422 when it does not fit."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MalformedRequest(str(e), error="malformed JSON") from e
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise InvalidInput(validation_details(e.errors())) from e


class ImageReader:
    """Image files -> [B, 1, 28, 28], without holding up the event loop.

    PNGs that are already 28x28 8-bit grey (what MNIST tooling sends) decode in tens of
    microseconds: they are decoded on the event loop, every request's files queued in
    the same loop turn back to back (batching.LoopTurnGroup says why). Anything else,
    from a phone photo to a batch of page scans, can take from milliseconds to seconds:
    it is decoded on a small thread pool (Pillow and numpy release the GIL while they
    work), so health checks and other requests keep being answered, and a request whose
    files are not done within `timeout_s` gets a 504; its remaining files are skipped.
    """

    def __init__(self, max_pixels: int, timeout_s: float, threads: int | None = None) -> None:
        self.max_pixels, self.timeout_s = max_pixels, timeout_s
        self.pool = ThreadPoolExecutor(max_workers=threads or min(4, os.cpu_count() or 1),
                                       thread_name_prefix="images")
        self.small = LoopTurnGroup(lambda blobs, headers, prep: grays_to_tensor(
            [gray28(b, h, max_pixels, prep) for b, h in zip(blobs, headers, strict=True)]))

    async def __call__(self, blobs: list[bytes], prep: Preprocess) -> torch.Tensor:
        headers = [png_header(b) for b in blobs]  # read once: routing, then the pixel limit and the decoder
        if all(is_small_gray(h) for h in headers):
            return await self.small(blobs, headers, prep)
        cancelled = threading.Event()
        deadline = time.monotonic() + self.timeout_s
        work = asyncio.get_running_loop().run_in_executor(self.pool, self._decode, blobs, headers, prep, deadline,
                                                          cancelled)
        try:
            return await asyncio.wait_for(work, self.timeout_s)
        except TimeoutError:
            cancelled.set()
            raise ComputeTimeout(f"images not decoded within {self.timeout_s} s (VAE_REQUEST_TIMEOUT_S)") from None

    def _decode(self, blobs: list[bytes], headers: list[PngHeader | None], prep: Preprocess, deadline: float,
                cancelled: threading.Event) -> torch.Tensor:
        grays = []
        for b, h in zip(blobs, headers, strict=True):
            if cancelled.is_set() or time.monotonic() > deadline:
                raise ComputeTimeout("gave up decoding: the request ran out of time")
            grays.append(gray28(b, h, self.max_pixels, prep))
        return grays_to_tensor(grays)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)


async def read_images(request: Request, limits: Limits, reader: ImageReader, prep: Preprocess) -> torch.Tensor:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        return await reader(await _multipart(request, limits), prep)
    if ctype == "application/json":
        body = parse_body(ImagesIn, await request.body())
        if (body.images is None) == (body.pixels is None):
            raise InvalidInput("give exactly one of 'images' (base64 files) or 'pixels'")
        if body.pixels is not None:
            limits.check_batch(len(body.pixels))
            return torch.cat([pixels_to_tensor(p) for p in body.pixels]).unsqueeze(1)
        assert body.images is not None
        limits.check_batch(len(body.images))
        return await reader([_b64(s, i) for i, s in enumerate(body.images)], prep)
    if ctype.startswith("image/") or ctype == "application/octet-stream":
        return await reader([await request.body()], prep)
    raise UnsupportedMediaType(f"got {ctype or 'no Content-Type'}; send image/* or application/octet-stream (raw "
                               "bytes), multipart/form-data with field 'file', or application/json with 'images' "
                               "or 'pixels'")


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

