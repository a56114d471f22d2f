"""HTTP plumbing for the API: the one error shape, and request bodies read within their limits.

Every error is `{"error": {"code", "message", "field"}}` (schemas.ErrorBody). A body is refused before
it is read whole: its declared Content-Length first, then a running count while it streams in.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

JSON_TYPES = ("application/json",)


class ApiError(Exception):
    """An error answered as {"error": {"code", "message", "field"}} with an HTTP status."""

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.field, self.headers = status, code, message, field, headers


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}}, status_code=status,
                        headers=headers)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "request.too_large", f"the request body is over the limit of {limit:,} bytes")


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks; ApiError 413 as soon as it is declared or found to be over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit)
        except ValueError:
            raise ApiError(400, "request.invalid", "Content-Length is not a number") from None
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        yield chunk


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body: 415 unless application/json, 413 over `limit`, 400 when it does not parse."""
    if media_type(request) not in JSON_TYPES:
        raise ApiError(415, "request.unsupported_media_type", "send the body as JSON with "
                       "Content-Type: application/json")
    body = b"".join([chunk async for chunk in limited_stream(request, limit)])
    try:
        return json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "request.invalid", f"the body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError(400, "request.invalid", "the body is nested too deeply") from None


async def read_multipart(request: Request, limit: int, *, max_files: int, max_fields: int = 10) -> FormData:
    """A multipart/form-data body, at most `limit` bytes in all; 415 for any other type."""
    if media_type(request) != "multipart/form-data":
        raise ApiError(415, "request.unsupported_media_type", "send the files as multipart/form-data")
    parser = MultiPartParser(request.headers, limited_stream(request, limit), max_files=max_files,
                             max_fields=max_fields, max_part_size=128 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise ApiError(400, "request.invalid", f"the form is not valid: {exc.message}") from None
