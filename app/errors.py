"""The one place where failures become HTTP answers: {"error": "...", "detail": ...} with a status.

Domain errors (app/exceptions.py) map to statuses by kind in `STATUS`; FastAPI's and
Starlette's own errors get the same body shape, so a client parses one format.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import exceptions as ex

log = logging.getLogger("app.errors")

STATUS: dict[type[ex.ServiceError], int] = {
    ex.MalformedRequest: 400,
    ex.Unauthorized: 401,
    ex.Forbidden: 403,
    ex.UnknownModel: 404,
    ex.ArtifactRefused: 422,
    ex.NoLatentMap: 404,
    ex.FormatNotAvailable: 406,
    ex.LimitExceeded: 413,
    ex.RequestTimeout: 408,
    ex.UnsupportedMediaType: 415,
    ex.UndecodableImage: 415,
    ex.InvalidInput: 422,
    ex.Unavailable: 503,
    ex.ComputeTimeout: 504,
}
RETRY_LATER = {"Retry-After": "1"}
# RFC 6750: which scheme to use, and (a key was sent) that it was the key that failed
ASK_FOR_KEY = {"WWW-Authenticate": 'Bearer realm="vae"'}
BAD_KEY = {"WWW-Authenticate": 'Bearer realm="vae", error="invalid_token"'}


def headers_for(exc: ex.ServiceError, status: int) -> dict[str, str] | None:
    if status == 503:
        return RETRY_LATER
    if status == 401:
        return BAD_KEY if exc.error == "invalid API key" else ASK_FOR_KEY
    return None


def status_of(exc: ex.ServiceError) -> int:
    """The status of the nearest mapped kind in the exception's class hierarchy."""
    for kind in type(exc).__mro__:
        if kind in STATUS:
            return STATUS[kind]
    return 500


def error_response(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


def service_error_response(exc: ex.ServiceError) -> JSONResponse:
    status = status_of(exc)
    return error_response(status, exc.error, exc.detail, headers_for(exc, status))


PROTOCOL_PREFIX = "/v2"  # Open Inference Protocol routes: errors in that protocol's shape


def protocol_status(exc: ex.ServiceError) -> int:
    """The Open Inference Protocol's statuses: 400 for anything wrong with the request, 404 for an
    unknown model; the body limit (checked before the request is read), overload and timeouts keep theirs."""
    status = status_of(exc)
    if 400 <= status < 500 and status not in (401, 403, 404, 408) and not isinstance(exc, ex.BodyTooLarge):
        return 400
    return status


def protocol_error_response(exc: ex.ServiceError) -> JSONResponse:
    """{"error": "<title>: <what to fix>"}: the protocol's error body has one string."""
    status = protocol_status(exc)
    return JSONResponse({"error": error_message(exc)}, status_code=status, headers=headers_for(exc, status))


GRPC_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    408: grpc.StatusCode.DEADLINE_EXCEEDED,
    413: grpc.StatusCode.INVALID_ARGUMENT,  # a batch or k over its limit; gRPC's own message limit has its code
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


def grpc_code(exc: ex.ServiceError) -> grpc.StatusCode:
    """The gRPC status of a domain error (app/rpc/service.py): overload is a resource to back off from,
    a refused model file a state of the repository that a request cannot fix."""
    if isinstance(exc, ex.Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(exc, ex.ArtifactRefused):
        return grpc.StatusCode.FAILED_PRECONDITION
    return GRPC_CODES.get(protocol_status(exc), grpc.StatusCode.INTERNAL)


def error_message(exc: ex.ServiceError) -> str:
    """The protocol's one-string error: `<title>: <what to fix>`."""
    return f"{exc.error}: {describe(exc.detail)}" if exc.detail else exc.error


def describe(detail: Any) -> str:
    """A detail as one line: validation errors become `loc: msg` pairs."""
    if isinstance(detail, list) and all(isinstance(d, dict) and "msg" in d for d in detail):
        return "; ".join(f"{'.'.join(map(str, d.get('loc', ())))}: {d['msg']}" for d in detail)
    return str(detail)


def is_protocol(path: str) -> bool:
    return path == PROTOCOL_PREFIX or path.startswith(PROTOCOL_PREFIX + "/")


def error_response_for(path: str, exc: ex.ServiceError) -> JSONResponse:
    """The error in the shape of the API the path belongs to."""
    if is_protocol(path):
        return protocol_error_response(exc)
    return service_error_response(exc)


def internal_error_response(exc: BaseException) -> JSONResponse:
    """A bug, not a bad request: the traceback goes to the log, the client gets the exception's type only."""
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal error", type(exc).__name__)


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # pydantic puts the offending value (maybe NaN/inf, not valid JSON) and exception objects in ctx.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def install(app: FastAPI) -> None:
    @app.exception_handler(ex.ServiceError)
    async def _service_error(request: Request, exc: ex.ServiceError) -> JSONResponse:
        return error_response_for(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response_for(request.url.path, ex.InvalidInput(validation_details(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if is_protocol(request.url.path):
            return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))
