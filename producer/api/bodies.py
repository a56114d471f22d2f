"""Request bodies read within their limits: refused before they are read whole, by their declared
Content-Length first, then by a running count while they stream in."""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import Request
from starlette.datastructures import FormData
from starlette.formparsers import MultiPartException, MultiPartParser

from contracts.errors import ApiCallError, JsonTooDeep, RequestError
from contracts.json_shape import loads_bounded

JSON_TYPES = ("application/json",)


def too_large(limit: int, *, what: str = "", setting: str = "QVQ_MAX_REQUEST_BYTES") -> ApiCallError:
    """413: the body is over a limit (by default its size in bytes)."""
    message = (f"the request holds {what}, over the limit of {limit:,} ({setting})" if what
               else f"the request body is over the limit of {limit:,} bytes")
    return ApiCallError(message, code="request.too_large", status=413)


def unsupported(message: str) -> ApiCallError:
    return ApiCallError(message, code="request.unsupported_media_type", status=415)


def bad_request(message: str, field: str | None = None) -> ApiCallError:
    """A body or header that cannot be read at all (400, request.invalid)."""
    return ApiCallError(message, code="request.invalid", status=400, field=field)


def invalid(message: str, field: str | None = None) -> RequestError:
    """A field that is not valid (422, request.invalid)."""
    return RequestError(message, field=field)


def media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";", 1)[0].strip().lower()


async def limited_stream(request: Request, limit: int) -> AsyncGenerator[bytes, None]:
    """The body's chunks; 413 as soon as it is declared or found to be over `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise too_large(limit)
        except ValueError:
            raise bad_request("Content-Length is not a number") from None
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > limit:
            raise too_large(limit)
        yield chunk


async def read_json(request: Request, limit: int) -> Any:
    """The JSON body: 415 unless application/json, 413 over `limit`, 400 when it does not parse."""
    if media_type(request) not in JSON_TYPES:
        raise unsupported("send the body as JSON with Content-Type: application/json")
    return parse_json(b"".join([chunk async for chunk in limited_stream(request, limit)]) or b"null")


def parse_json(raw: bytes) -> Any:
    """A JSON body: 400 when it does not parse or nests deeper than contracts/json_shape.py allows."""
    try:
        return loads_bounded(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise bad_request(f"the body is not valid JSON: {exc}") from None
    except JsonTooDeep as exc:
        raise bad_request(f"the body is {exc.message}") from None


async def read_multipart(request: Request, limit: int, *, max_files: int, max_fields: int = 10) -> FormData:
    """A multipart/form-data body, at most `limit` bytes in all; 415 for any other type."""
    if media_type(request) != "multipart/form-data":
        raise unsupported("send the files as multipart/form-data")
    parser = FilePartsParser(request.headers, limited_stream(request, limit), max_files=max_files,
                             max_fields=max_fields, max_part_size=128 * 1024)
    try:
        return await parser.parse()
    except MultiPartException as exc:
        raise bad_request(f"the form is not valid: {exc.message}") from None


class FilePartsParser(MultiPartParser):
    """Starlette's multipart parser, except that a part sent with a Content-Type other than text/* is a
    file even when its Content-Disposition names no filename: generated clients (and httpx's `files=` with
    no name) send image parts that way, and they would otherwise be read as text fields and refused."""

    def on_headers_finished(self) -> None:
        part = self._current_part
        content_type = dict((name.lower(), value) for name, value in part.item_headers).get(b"content-type", b"")
        disposition = part.content_disposition or b""
        if content_type.strip() and not content_type.strip().lower().startswith(b"text/") \
                and b"filename" not in disposition.lower():
            part.content_disposition = disposition + b'; filename="upload"'
        super().on_headers_finished()

