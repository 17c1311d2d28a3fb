"""Tensors on the wire, as the Open Inference Protocol's REST side carries them.

Two encodings, which may be mixed tensor by tensor in one request or response:
- JSON: each tensor's `data` holds its elements in row-major order, flat or nested;
- the binary tensor data extension (what tritonclient sends by default): the body is the
  JSON document, then each binary tensor's raw little-endian bytes in the order the
  tensors are listed; `Inference-Header-Content-Length` gives the JSON document's length
  and each binary tensor's `parameters.binary_data_size` its share of the rest. A BYTES
  element is a 4-byte little-endian length, then that many bytes.

Nothing here knows what a tensor means (catalog.py does); every malformed request ends as
a domain error that names the tensor and what is wrong with it.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import pydantic_core
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.errors import validation_details
from app.exceptions import BatchTooLarge, InvalidInput, MalformedRequest

HEADER_LENGTH = "inference-header-content-length"
BYTES = "BYTES"
NUMERIC: dict[str, np.dtype] = {name: np.dtype(code) for name, code in (
    ("BOOL", "?"), ("UINT8", "u1"), ("UINT16", "<u2"), ("UINT32", "<u4"), ("UINT64", "<u8"), ("INT8", "i1"),
    ("INT16", "<i2"), ("INT32", "<i4"), ("INT64", "<i8"), ("FP16", "<f2"), ("FP32", "<f4"), ("FP64", "<f8"))}
DATATYPES = (*NUMERIC, BYTES)
MAX_TENSORS = 64  # far more than any model here takes; bounds the work a malformed header can ask for
Parameters = dict[str, Any]


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=256)
    shape: list[Annotated[int, Field(ge=0)]] = Field(max_length=8)
    datatype: str = Field(max_length=16)
    parameters: Parameters = Field(default_factory=dict)
    data: Any = None


class RequestOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(max_length=256)
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str | None = Field(None, max_length=256)
    parameters: Parameters = Field(default_factory=dict)
    inputs: list[RequestInput] = Field(max_length=MAX_TENSORS)
    outputs: list[RequestOutput] | None = Field(None, max_length=MAX_TENSORS)


@dataclass(frozen=True, slots=True)
class Tensor:
    """An input as received: numeric tensors as a shaped numpy array; BYTES as a list of elements,
    `bytes` when sent binary, `str` when sent as JSON (JSON has no byte strings)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray | None = None
    elements: list[bytes | str] | None = None


@dataclass(frozen=True, slots=True)
class Output:
    name: str
    datatype: str
    array: np.ndarray


def read_request(body: bytes, header_length: str | None, max_values: int) -> tuple[InferenceRequest, list[Tensor]]:
    """The request document and its input tensors, from a JSON body or a binary-extension body.

    A document of more than `max_values` values (commas + 1 bound them, as app/inputs.py's
    parse_body counts) is refused before it is parsed: no model here takes that many."""
    if header_length is None:
        header, rest = body, b""
    else:
        # isdigit() alone takes "²" and other Unicode digits, which int() then refuses
        if not (header_length.isascii() and header_length.isdigit()) or not 0 < int(header_length) <= len(body):
            raise MalformedRequest(f"Inference-Header-Content-Length {header_length!r} is not a length within the "
                                   f"{len(body)}-byte body")
        header, rest = body[:int(header_length)], body[int(header_length):]
    if header.count(b",") >= max_values:
        raise BatchTooLarge(f"the inference request's JSON holds more than {max_values} values; the largest "
                            "request a model here takes is a full batch of 28x28 images (VAE_MAX_BATCH)")
    try:
        request = InferenceRequest.model_validate_json(header)
    except ValidationError as e:
        invalid = [err for err in e.errors() if err["type"] == "json_invalid"]
        reason = invalid[0].get("ctx", {}).get("error", "") if invalid else ""
        if reason.startswith("recursion limit exceeded"):  # the parser's limit: 200 levels
            raise MalformedRequest(f"the inference request's JSON is nested too deep: {reason}",
                                   error="malformed JSON") from e
        if invalid:
            raise MalformedRequest("the inference request is not a JSON document" + (
                "" if header_length else " (binary tensors need the Inference-Header-Content-Length header)"),
                error="malformed JSON") from e
        raise InvalidInput(validation_details(e.errors())) from e
    tensors, offset = [], 0
    for spec in request.inputs:
        size = spec.parameters.get("binary_data_size")
        if size is None:
            tensors.append(_from_json(spec))
            continue
        if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(rest):
            raise InvalidInput(f"input {spec.name!r}: binary_data_size {size!r} is more than the "
                               f"{len(rest) - offset} bytes of binary data left in the body")
        tensors.append(from_bytes(spec, rest[offset:offset + size]))
        offset += size
    if offset != len(rest):
        raise InvalidInput(f"{len(rest) - offset} bytes of binary data after the last binary input")
    return request, tensors


def count_of(spec: RequestInput) -> int:
    if spec.datatype not in DATATYPES:
        raise InvalidInput(f"input {spec.name!r}: datatype {spec.datatype!r} is none of {', '.join(DATATYPES)}")
    return math.prod(spec.shape)


def from_bytes(spec: RequestInput, chunk: bytes) -> Tensor:
    count = count_of(spec)
    if spec.datatype == BYTES:
        return Tensor(spec.name, BYTES, tuple(spec.shape), elements=_split_bytes(spec.name, chunk, count))
    dtype = NUMERIC[spec.datatype]
    if len(chunk) != count * dtype.itemsize:
        raise InvalidInput(f"input {spec.name!r}: shape {spec.shape} of {spec.datatype} is {count * dtype.itemsize} "
                           f"bytes; binary_data_size says {len(chunk)}")
    # A copy: the body's bytes are read-only, and torch wants to own what it is given.
    return Tensor(spec.name, spec.datatype, tuple(spec.shape), np.frombuffer(chunk, dtype).reshape(spec.shape).copy())


def _split_bytes(name: str, chunk: bytes, count: int) -> list[bytes | str]:
    elements: list[bytes | str] = []
    offset = 0
    while offset < len(chunk):
        if offset + 4 > len(chunk):
            raise InvalidInput(f"input {name!r}: BYTES element {len(elements)} has a cut-off length prefix")
        (n,) = struct.unpack_from("<I", chunk, offset)
        if offset + 4 + n > len(chunk):
            raise InvalidInput(f"input {name!r}: BYTES element {len(elements)} says {n} bytes; "
                               f"{len(chunk) - offset - 4} are left")
        elements.append(chunk[offset + 4:offset + 4 + n])
        offset += 4 + n
    if len(elements) != count:
        raise InvalidInput(f"input {name!r}: shape says {count} BYTES elements; the data holds {len(elements)}")
    return elements


def _from_json(spec: RequestInput) -> Tensor:
    count = count_of(spec)
    if spec.data is None:
        raise InvalidInput(f"input {spec.name!r} has neither 'data' nor parameters.binary_data_size")
    data = spec.data if isinstance(spec.data, list) else [spec.data]
    if spec.datatype == BYTES:
        elements = _flatten(data)
        if len(elements) != count or not all(isinstance(e, str) for e in elements):
            raise InvalidInput(f"input {spec.name!r}: shape {spec.shape} needs {count} strings in 'data'")
        return Tensor(spec.name, BYTES, tuple(spec.shape), elements=elements)
    dtype = NUMERIC[spec.datatype]
    try:
        raw = np.asarray(data)
    except ValueError as e:  # ragged nesting
        raise InvalidInput(f"input {spec.name!r}: 'data' is not a regular array ({e})") from e
    if raw.size != count:
        raise InvalidInput(f"input {spec.name!r}: shape {spec.shape} needs {count} values; 'data' holds {raw.size}")
    if raw.size and raw.dtype.kind not in "biuf":
        raise InvalidInput(f"input {spec.name!r}: 'data' must hold numbers (or booleans for BOOL)")
    array = raw.astype(dtype).reshape(spec.shape)
    if dtype.kind in "biu" and raw.size and not np.array_equal(array.reshape(raw.shape), raw):
        raise InvalidInput(f"input {spec.name!r}: a value in 'data' is not representable as {spec.datatype}")
    return Tensor(spec.name, spec.datatype, tuple(spec.shape), array)


def _flatten(data: list[Any]) -> list[Any]:
    out: list[Any] = []
    for item in data:
        out.extend(_flatten(item) if isinstance(item, list) else [item])
    return out


def write_response(model_name: str, model_version: str, request: InferenceRequest, outputs: list[Output],
                   parameters: Parameters) -> tuple[bytes, int | None]:
    """The response body, and the JSON document's length when binary tensors follow it (None: all JSON).

    Outputs are those the request lists (in its order), else all; each is binary when its
    `binary_data` parameter says so, else when the request's `binary_data_output` does.
    """
    by_name = {o.name: o for o in outputs}
    wanted = [(o.name, o.parameters) for o in request.outputs] if request.outputs else [(o.name, {}) for o in outputs]
    binary_default = request.parameters.get("binary_data_output") is True
    documents, blobs = [], []
    for name, params in wanted:
        if name not in by_name:
            raise InvalidInput(f"output {name!r}: model {model_name!r} has outputs {', '.join(by_name)}")
        out = by_name[name]
        doc: dict[str, Any] = {"name": name, "datatype": out.datatype, "shape": list(out.array.shape)}
        if params.get("binary_data", binary_default) is True:
            blob = out.array.astype(NUMERIC[out.datatype], copy=False).tobytes()
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            doc["data"] = out.array.reshape(-1).tolist()
        documents.append(doc)
    response: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request.id is not None:
        response["id"] = request.id
    if parameters:
        response["parameters"] = parameters
    response["outputs"] = documents
    header = pydantic_core.to_json(response)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
