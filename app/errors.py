"""The one place where failures become HTTP answers: {"error": "...", "detail": ...} with a status.

Domain errors (app/exceptions.py) map to statuses by kind in `STATUS`; FastAPI's and
Starlette's own errors get the same body shape, so a client parses one format.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import exceptions as ex

log = logging.getLogger("app.errors")

STATUS: dict[type[ex.ServiceError], int] = {
    ex.MalformedRequest: 400,
    ex.UnknownModel: 404,
    ex.FormatNotAvailable: 406,
    ex.LimitExceeded: 413,
    ex.UnsupportedMediaType: 415,
    ex.UndecodableImage: 415,
    ex.InvalidInput: 422,
    ex.Unavailable: 503,
    ex.ComputeTimeout: 504,
}
RETRY_LATER = {"Retry-After": "1"}


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
    return error_response(status, exc.error, exc.detail, RETRY_LATER if status == 503 else None)


def internal_error_response(exc: BaseException) -> JSONResponse:
    """A bug, not a bad request: the traceback goes to the log, the client gets the exception's type only."""
    log.error("unhandled %s", type(exc).__name__, exc_info=exc)
    return error_response(500, "internal error", type(exc).__name__)


def validation_details(errors: Sequence[Any]) -> list[dict[str, Any]]:
    # pydantic puts the offending value (maybe NaN/inf, not valid JSON) and exception objects in ctx.
    return [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in errors]


def install(app: FastAPI) -> None:
    @app.exception_handler(ex.ServiceError)
    async def _service_error(_: Request, exc: ex.ServiceError) -> JSONResponse:
        return service_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(422, "invalid request", validation_details(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))
