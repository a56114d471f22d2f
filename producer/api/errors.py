"""The API's errors, answered in one place: every QvqError with the status of producer/wire.py's table, as
{"error": {"code", "message", "field"}} (schemas.ErrorBody); FastAPI's own validation and routing errors
in the same shape; a store or Redis that cannot be reached as 503; anything else as 500 with an error id
(the traceback goes to the log, never to the caller: no internal address or secret in an answer).
"""

from __future__ import annotations

import uuid
from typing import Any

import redis
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from contracts.errors import EnqueueError, QvqError
from contracts.logging import get_logger
from producer.api.responses import JSONResponse
from producer.wire import body_of, status_of

log = get_logger(__name__)
UNAVAILABLE = "the service's queue or database is unavailable right now; nothing was changed, try again"


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers=headers)


def install(app: FastAPI) -> None:
    app.add_exception_handler(QvqError, _ours)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _invalid)  # type: ignore[arg-type]
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(Exception, _internal)
    for unreachable in (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError, redis.RedisError,
                        OSError):
        app.add_exception_handler(unreachable, _unavailable)


async def _ours(_request: Request, exc: QvqError) -> JSONResponse:
    if isinstance(exc, EnqueueError):
        log.error("api.enqueue_failed", error=exc.detail or exc.message)
    return JSONResponse(body_of(exc), status_code=status_of(exc), headers=getattr(exc, "headers", None))


async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {}
    location = [str(part) for part in first.get("loc", ()) if part not in {"body", "query", "header", "path"}]
    field = ".".join(location) or None
    message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg", "invalid request"))
    return error_response(422, "request.invalid", message, field)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    code = "not_found" if exc.status_code == 404 else "request.invalid" if exc.status_code < 500 else "internal"
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # every method of the path, not only those of the first route matched
        headers["Allow"] = ", ".join(_allowed_methods(request))
    return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)


async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.error("api.dependency_unavailable", error=type(exc).__name__, detail=str(exc))
    return error_response(503, "unavailable", UNAVAILABLE)


async def _internal(_request: Request, exc: Exception) -> JSONResponse:
    error_id = uuid.uuid4().hex[:12]
    log.error("api.internal_error", error_id=error_id, error=type(exc).__name__, exc_info=exc)
    return error_response(500, "internal", f"an internal error occurred (error id {error_id})")


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match: Any
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE or route.matches({**request.scope, "method": "POST"})[0] != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)
