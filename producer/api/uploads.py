"""Uploads over HTTP: images that callers cannot name as files on the server (producer/service/uploads.py).

| method + path | does |
|---|---|
| POST /v1/uploads | multipart, one image `file` -> 201 {"upload_id", "ref": "upload://<id>", ...}, for the uploader's tenant |
| POST /v1/tasks/upload | multipart: image file(s) + prompt (+ model, high_resolution) -> uploads them and submits, as POST /v1/tasks |

Uploads past QVQ_UPLOAD_TTL_S are deleted by `sweep_uploads`, for as long as the API runs.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from contracts.catalog import MODELS
from contracts.image_formats import ACCEPTED, MIME
from contracts.job import MAX_PROMPT_CHARS
from contracts.logging import get_logger
from contracts.store import UploadRecord, iso
from contracts.tenants import Principal
from producer.api import schemas
from producer.api.bodies import invalid, read_multipart
from producer.api.deps import Api, AppServices, Caller
from producer.api.responses import JSONResponse
from producer.api.tasks import created_response, request_trace

log = get_logger(__name__)
router = APIRouter()
MAX_UPLOAD_FILES = 10  # per POST /v1/tasks/upload
UPLOAD_TASK_FIELDS = {"images", "prompt", "model", "high_resolution"}
MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers on top of the files themselves
UPLOAD_SWEEP_S = 300.0  # how often expired uploads are deleted


def _multipart_body(*, single: bool) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    properties: dict[str, Any] = {"file": binary} if single else {
        "images": {"type": "array", "items": binary, "minItems": 1, "maxItems": MAX_UPLOAD_FILES},
        "prompt": {"type": "string", "minLength": 1, "maxLength": MAX_PROMPT_CHARS, "pattern": schemas.NOT_BLANK},
        "model": {"type": "string", "enum": list(MODELS)}, "high_resolution": {"type": "boolean"}}
    required = ["file"] if single else ["images", "prompt"]
    images = {"contentType": ", ".join(MIME[name] for name in ACCEPTED)}  # sniffed from the bytes, whatever is sent
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False},
        "encoding": {"file" if single else "images": images}}}}}


@router.post("/uploads", status_code=201, response_model=schemas.UploadCreated,
             responses=schemas.error_responses(400, 401, 413, 415, 422, 503), openapi_extra=_multipart_body(single=True))
async def upload_image(request: Request, api: Api, principal: Caller) -> JSONResponse:
    """Store one image for this tenant; use the returned `upload://` reference in a job's images."""
    form = await read_multipart(request, api.settings.max_image_bytes + MULTIPART_OVERHEAD, max_files=1)
    _only_fields(form, {"file"})
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise invalid("send the image as the form field `file`", field="file")
    upload = await _store(api, principal, file, "file")
    return JSONResponse(status_code=201, content={
        "upload_id": upload.id, "ref": upload.ref, "format": upload.format, "bytes": upload.bytes,
        "expires_at": iso(upload.expires_at)})


@router.post("/tasks/upload", status_code=202, response_model=schemas.TaskCreated,
             responses=schemas.error_responses(400, 401, 413, 415, 422, 503),
             openapi_extra=_multipart_body(single=False))
async def upload_task(request: Request, api: Api, principal: Caller) -> JSONResponse:
    """Upload image file(s) and submit a job for them in one request."""
    limit = MAX_UPLOAD_FILES * api.settings.max_image_bytes + MULTIPART_OVERHEAD
    form = await read_multipart(request, limit, max_files=MAX_UPLOAD_FILES)
    _only_fields(form, UPLOAD_TASK_FIELDS)
    files = [item for item in form.getlist("images") if isinstance(item, UploadFile)]
    if not files:
        raise invalid("at least one image file is required", field="images")
    body: dict[str, Any] = {"prompt": _form_text(form.get("prompt"), "prompt")}
    if model := _form_text(form.get("model"), "model", required=False):
        body["model"] = model
    high_resolution = _form_text(form.get("high_resolution"), "high_resolution", required=False).lower()
    if high_resolution not in {"", "true", "false"}:
        raise invalid("true or false", field="high_resolution")
    if high_resolution == "true":
        body["high_resolution"] = True
    stored: list[UploadRecord] = []
    try:
        for index, file in enumerate(files):
            stored.append(await _store(api, principal, file, f"images[{index}]"))
        body["images"] = [upload.ref for upload in stored]
        return created_response(await api.run(api.services.tasks.submit, principal, body, trace=request_trace(request)))
    except BaseException:
        for upload in stored:
            await api.run(api.services.uploads.delete, upload.id)
        raise


async def _store(api: AppServices, principal: Principal, file: UploadFile, field: str) -> UploadRecord:
    data = await file.read(api.settings.max_image_bytes + 1)
    return await api.run(api.services.uploads.add, principal, data, file.filename, field)


def _only_fields(form: Any, allowed: set[str]) -> None:
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise invalid(f"unknown form field(s) {', '.join(map(repr, unknown))}", field=unknown[0][:64])


def _form_text(value: Any, field: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise invalid("a text field is required", field=field)
    return value


async def sweep_uploads(api: AppServices) -> None:
    """Delete uploads past their retention (QVQ_UPLOAD_TTL_S), for as long as the API runs."""
    while True:
        try:
            await api.run(api.services.uploads.delete_expired)
        except Exception as exc:  # the next round tries again
            log.warning("uploads.sweep_failed", error=type(exc).__name__)
        await asyncio.sleep(min(UPLOAD_SWEEP_S, max(1.0, api.settings.upload_ttl_s / 4)))
