"""Tensors and parameters between the gRPC messages and the protocol's own types (app/protocol/codec.py).

An input comes either as its raw little-endian bytes (`raw_input_contents`, what
tritonclient and KServe's client send) or in the typed `contents` field of its datatype; a
request uses one or the other for all its inputs, as the protocol says. Outputs always go
back raw, as Triton sends them. Every malformed tensor ends as a domain error naming it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import ValidationError

from app.errors import describe, validation_details
from app.exceptions import InvalidInput
from app.protocol.codec import BYTES, NUMERIC, Output, Parameters, RequestInput, Tensor, count_of, from_bytes
from app.rpc import inference_pb2 as pb

# The typed field that carries each datatype (FP16 has none: it travels raw only).
CONTENTS = {"BOOL": "bool_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
            "UINT32": "uint_contents", "UINT64": "uint64_contents", "INT8": "int_contents",
            "INT16": "int_contents", "INT32": "int_contents", "INT64": "int64_contents",
            "FP32": "fp32_contents", "FP64": "fp64_contents", BYTES: "bytes_contents"}


def inputs_of(request: pb.ModelInferRequest) -> list[Tensor]:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(f"{len(raw)} raw_input_contents for {len(request.inputs)} inputs: with raw contents, "
                           "every input has one, in the order of `inputs`")
    tensors = []
    for i, given in enumerate(request.inputs):
        spec = _spec(given)
        if raw:
            if given.HasField("contents"):
                raise InvalidInput(f"input {given.name!r} has both raw and typed contents")
            tensors.append(from_bytes(spec, raw[i]))
        else:
            tensors.append(_from_contents(spec, given.contents))
    return tensors


def _spec(given: pb.ModelInferRequest.InferInputTensor) -> RequestInput:
    try:
        return RequestInput(name=given.name, shape=list(given.shape), datatype=given.datatype)
    except ValidationError as e:
        raise InvalidInput(f"input {given.name[:64]!r}: {describe(validation_details(e.errors()))}") from e


def _from_contents(spec: RequestInput, contents: pb.InferTensorContents) -> Tensor:
    count = count_of(spec)
    field = CONTENTS.get(spec.datatype)
    if field is None:
        raise InvalidInput(f"input {spec.name!r}: {spec.datatype} travels in raw_input_contents only")
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidInput(f"input {spec.name!r}: shape {spec.shape} needs {count} values; contents.{field} holds "
                           f"{len(values)}")
    shape = tuple(spec.shape)
    if spec.datatype == BYTES:
        return Tensor(spec.name, BYTES, shape, elements=list(values))
    dtype = NUMERIC[spec.datatype]
    given = np.asarray(values)
    array = given.astype(dtype).reshape(shape)
    if dtype.kind in "iu" and count and not np.array_equal(array.reshape(-1), given):
        raise InvalidInput(f"input {spec.name!r}: a value in contents.{field} is not representable as "
                           f"{spec.datatype}")
    return Tensor(spec.name, spec.datatype, shape, array)


def parameters_of(given: Any) -> Parameters:
    """A protobuf map of InferParameter (or ModelRepositoryParameter) as plain values."""
    out: Parameters = {}
    for key, p in given.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def set_parameters(target: Any, parameters: Parameters) -> None:
    for key, value in parameters.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


def response_of(request: pb.ModelInferRequest, version: str, outputs: list[Output], parameters: Parameters
                ) -> pb.ModelInferResponse:
    """The outputs the request names (in its order), else all, each as raw bytes."""
    by_name = {o.name: o for o in outputs}
    wanted = [o.name for o in request.outputs] or list(by_name)
    response = pb.ModelInferResponse(model_name=request.model_name, model_version=version, id=request.id)
    set_parameters(response.parameters, parameters)
    for name in wanted:
        if name not in by_name:
            raise InvalidInput(f"output {name!r}: model {request.model_name!r} has outputs {', '.join(by_name)}")
        out = by_name[name]
        response.outputs.add(name=name, datatype=out.datatype, shape=list(out.array.shape))
        response.raw_output_contents.append(out.array.astype(NUMERIC[out.datatype], copy=False).tobytes())
    return response
