"""The HTTP API: enqueue jobs, read their state, cancel and retry them, watch their events live (SSE),
list them and their usage, upload images, and a web page.

    qvq api --port 8000                     # or: uvicorn --factory producer.api:create_app

| method + path | does |
|---|---|
| POST /v1/tasks | a JSON job request (design.md) -> 202 {"task_id", "created"} (200 when an idempotency key returned an earlier task) |
| POST /v1/uploads | multipart, one image `file` -> 201 {"upload_id", "ref": "upload://<id>", ...}, for the uploader's tenant |
| POST /v1/tasks/upload | multipart: image file(s) + prompt (+ model, high_resolution) -> uploads them and submits, as POST /v1/tasks |
| GET /v1/tasks | the caller's tasks, newest first: ?status=&since=&limit=&cursor= (&tenant= for admin keys) |
| GET /v1/tasks/{id} | the task's record |
| POST /v1/tasks/{id}/cancel | stop a queued or running task |
| POST /v1/tasks/{id}/retry | queue a failed or cancelled task again -> 202 {"task_id", "from_seq"} |
| GET /v1/tasks/{id}/events | Server-Sent Events: replay + live, resumable (Last-Event-ID or ?from_seq=), ends after the terminal event |
| GET /v1/usage | tokens and cost: ?by=model|tenant|day&since=&until= |
| GET / | the web viewer; GET /healthz | Redis and the database |

Every /v1/ request is authenticated (producer/security.py) before its body is read, and acts as the
tenant of its key: another tenant's task answers exactly like a missing one. Errors are
{"error": {"code", "message", "field"}} and never show an internal address or a secret.

Submitting, reading and cancelling use the synchronous client in the server's thread pool (short
calls); the SSE streams use the asyncio event bus, so a connected viewer costs a coroutine, never a thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import json
import logging
import re
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import redis
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from contracts import events as ev
from contracts.bus import RECONNECTABLE
from contracts.catalog import MODELS
from contracts.errors import RequestError
from contracts.flow import read_waiting
from contracts.image_formats import sniff_format
from contracts.logging import get_logger
from contracts.settings import Settings, get_settings
from contracts.store import ANY_TENANT, Store, TaskIdTaken, TaskRecord
from contracts.tenants import KeyRing, Principal
from contracts.uploads import UploadStorage
from producer import schemas
from producer.aio import AsyncClient
from producer.client import Client, EnqueueError
from producer.fanout import FanoutHub
from producer.http import ApiError, error_response, read_json, read_multipart
from producer.ops import install as install_ops
from producer.security import (
    Authenticator,
    LoopbackOnly,
    SecurityHeaders,
    authenticator,
    bearer_scheme,
    bearer_token,
    page_policy,
    query_key_scheme,
)

__all__ = ["ApiError", "create_app", "error_response", "format_sse", "sse_stream"]

log = get_logger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 15.0
SSE_RETRY_MS = 3000  # how long a browser waits before reconnecting a dropped stream
MAX_UPLOAD_FILES = 10  # per POST /v1/tasks/upload
UPLOAD_TASK_FIELDS = {"images", "prompt", "model", "high_resolution"}
MULTIPART_OVERHEAD = 64 * 1024  # form fields and part headers on top of the files themselves
UPLOAD_SWEEP_S = 300.0  # how often expired uploads are deleted
UNAVAILABLE = "the service's queue or database is unavailable right now; nothing was changed, try again"


@dataclass
class Services:
    """What the routes use; built and closed by the app's lifespan."""

    settings: Settings
    client: Client
    aclient: AsyncClient
    uploads: UploadStorage
    keepalive_s: float


def create_app(settings: Settings | None = None, *, keepalive_s: float = KEEPALIVE_S,
               upload_dir: str | Path | None = None) -> FastAPI:
    """The API app. `keepalive_s`: seconds between SSE keep-alive comments; `upload_dir`: a local
    directory for uploads instead of QVQ_UPLOAD_URL (tests, a single host)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await run_in_threadpool(Store.from_url, settings.database_url)
        services = Services(settings, Client(settings, store=store), AsyncClient(settings, store=store),
                            UploadStorage(settings, directory=upload_dir), keepalive_s)
        app.state.services = services
        app.state.fanout = FanoutHub(settings.redis_url)  # one pub/sub connection for every SSE viewer
        sweeper = asyncio.create_task(_sweep_uploads(services))
        try:
            yield
        finally:
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper
            await app.state.fanout.aclose()
            await services.aclient.aclose()
            await run_in_threadpool(services.client.close)

    app = FastAPI(title="qvq-queue", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.authenticator = Authenticator(KeyRing.parse(settings.api_keys))
    _install_error_handlers(app)
    _redact_access_log()
    app.include_router(_v1_router(), prefix="/v1")
    install_ops(app, settings)
    from producer.webhooks import router as webhooks_router  # it builds on this module's routes

    app.include_router(webhooks_router(), prefix="/v1")
    _install_middleware(app, settings)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz", include_in_schema=False)
    async def healthz(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        checks = {"redis": await _check(services.aclient.redis.ping()),
                  "database": await _check(run_in_threadpool(_ping_database, services.client.store))}
        healthy = all(checks.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", **checks},
                            status_code=200 if healthy else 503)

    return app


def _install_middleware(app: FastAPI, settings: Settings) -> None:
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type",
                                                                         "Last-Event-ID"])
    if not settings.api_keys and not settings.api_insecure:
        app.add_middleware(LoopbackOnly)
    app.add_middleware(SecurityHeaders, page_csp=page_policy(STATIC_DIR / "index.html"))


# -- who is calling ----------------------------------------------------------------------------
async def caller(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]) -> Principal:
    """The principal of the request's bearer key."""
    return authenticator(request).principal(bearer_token(credentials))


async def viewer(request: Request,
                 credentials: Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)],
                 api_key: Annotated[str | None, Security(query_key_scheme)] = None) -> Principal:
    """As `caller`, also accepting ?api_key= (EventSource cannot send headers)."""
    return authenticator(request).principal(bearer_token(credentials) or api_key)


Caller = Annotated[Principal, Depends(caller)]


# -- /v1 ---------------------------------------------------------------------------------------
def _v1_router() -> APIRouter:
    router = APIRouter()
    errors = schemas.error_responses
    router.add_api_route(
        "/tasks", submit_task, methods=["POST"], status_code=202, response_model=schemas.TaskCreated,
        responses={200: {"model": schemas.TaskCreated, "description": "an idempotency key returned an earlier task"},
                   **errors(400, 401, 403, 404, 409, 413, 415, 422, 503)},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/JobRequestBody"}}}}})
    router.add_api_route(
        "/uploads", upload_image, methods=["POST"], status_code=201, response_model=schemas.UploadCreated,
        responses=errors(400, 401, 413, 415, 422, 503), openapi_extra=_multipart_body(single=True))
    router.add_api_route(
        "/tasks/upload", upload_task, methods=["POST"], status_code=202, response_model=schemas.TaskCreated,
        responses=errors(400, 401, 413, 415, 422, 503), openapi_extra=_multipart_body(single=False))
    router.add_api_route("/tasks", list_tasks, methods=["GET"], response_model=schemas.TaskList,
                         responses=errors(400, 401, 403, 422, 503))
    router.add_api_route("/tasks/{task_id}", get_task, methods=["GET"], response_model=schemas.TaskRecord,
                         responses=errors(401, 404, 422, 503))
    router.add_api_route("/tasks/{task_id}/cancel", cancel_task, methods=["POST"], status_code=202,
                         response_model=schemas.CancelResult,
                         responses={200: {"model": schemas.CancelResult, "description": "it had already ended"},
                                    **errors(401, 404, 422, 503)})
    router.add_api_route("/tasks/{task_id}/retry", retry_task, methods=["POST"], status_code=202,
                         response_model=schemas.RetryResult, responses=errors(401, 404, 409, 422, 503))
    router.add_api_route(
        "/tasks/{task_id}/events", task_events, methods=["GET"], response_class=StreamingResponse,
        responses={200: {"description": "Server-Sent Events: `id: <seq>`, `event: <type>`, `data: <event JSON>`",
                         "content": {"text/event-stream": {"schema": {
                             "type": "object", "required": ["data"], "properties": {
                                 "id": {"type": "string"}, "event": {"type": "string"},
                                 "data": {"type": "string", "description": "the event JSON"}}}}}},
                   204: {"description": "the task had already ended before Last-Event-ID: nothing more will come"},
                   **errors(400, 401, 404, 410, 422, 503)})
    router.add_api_route("/usage", get_usage, methods=["GET"], response_model=schemas.UsageReport,
                         responses=errors(400, 401, 403, 422, 503))
    return router


def _multipart_body(*, single: bool) -> dict[str, Any]:
    binary = {"type": "string", "format": "binary"}
    properties: dict[str, Any] = {"file": binary} if single else {
        "images": {"type": "array", "items": binary, "minItems": 1, "maxItems": MAX_UPLOAD_FILES},
        "prompt": {"type": "string", "minLength": 1, "maxLength": 100_000, "pattern": schemas.NOT_BLANK},
        "model": {"type": "string", "enum": list(MODELS)}, "high_resolution": {"type": "boolean"}}
    required = ["file"] if single else ["images", "prompt"]
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
        "type": "object", "properties": properties, "required": required, "additionalProperties": False}}}}}


async def submit_task(request: Request, principal: Caller) -> JSONResponse:
    """Enqueue a job request (JSON, as in design.md)."""
    services = _services(request)
    body = await read_json(request, services.settings.max_request_bytes)
    if not isinstance(body, dict):
        raise ApiError(400, "request.invalid", "the body must be a JSON object (a job request)")
    return await _submit(services, principal, body)


async def upload_image(request: Request, principal: Caller) -> JSONResponse:
    """Store one image for this tenant; use the returned `upload://` reference in a job's images."""
    services = _services(request)
    form = await read_multipart(request, services.settings.max_image_bytes + MULTIPART_OVERHEAD, max_files=1)
    _only_fields(form, {"file"})
    file = form.get("file")
    if not isinstance(file, UploadFile):
        raise ApiError(422, "request.invalid", "send the image as the form field `file`", field="file")
    upload = await _store_upload(services, principal, file, "file")
    return JSONResponse(status_code=201, content={
        "upload_id": upload.id, "ref": upload.ref, "format": upload.format, "bytes": upload.bytes,
        "expires_at": upload.expires_at.isoformat()})


async def upload_task(request: Request, principal: Caller) -> JSONResponse:
    """Upload image file(s) and submit a job for them in one request."""
    services = _services(request)
    limit = MAX_UPLOAD_FILES * services.settings.max_image_bytes + MULTIPART_OVERHEAD
    form = await read_multipart(request, limit, max_files=MAX_UPLOAD_FILES)
    _only_fields(form, UPLOAD_TASK_FIELDS)
    files = [item for item in form.getlist("images") if isinstance(item, UploadFile)]
    if not files:
        raise ApiError(422, "request.invalid", "at least one image file is required", field="images")
    body: dict[str, Any] = {"prompt": _form_text(form.get("prompt"), "prompt")}
    if model := _form_text(form.get("model"), "model", required=False):
        body["model"] = model
    high_resolution = _form_text(form.get("high_resolution"), "high_resolution", required=False).lower()
    if high_resolution not in {"", "true", "false"}:
        raise ApiError(422, "request.invalid", "high_resolution: true or false", field="high_resolution")
    if high_resolution == "true":
        body["high_resolution"] = True
    stored = []
    try:
        for index, file in enumerate(files):
            stored.append(await _store_upload(services, principal, file, f"images[{index}]"))
        body["images"] = [upload.ref for upload in stored]
        return await _submit(services, principal, body)
    except BaseException:
        for upload in stored:
            await run_in_threadpool(_delete_upload, services, upload.id)
        raise


async def list_tasks(
    request: Request, principal: Caller,
    status: Annotated[schemas.ListedStatus | None, Query(description="`waiting`: queued or running tasks "
                                                                     "that flow control holds back")] = None,
    tenant: Annotated[str | None, Query(pattern=schemas.SAFE_ID_PATTERN, description="admin keys only")] = None,
    since: Annotated[str | None, Query(description="created at or after; " + schemas.DATETIME_DESCRIPTION,
                                       json_schema_extra={"format": "date-time"})] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict[str, Any]:
    """The caller's tasks, newest first, a page at a time."""
    services = _services(request)
    scope = _tenant_filter(principal, tenant)
    records: list[TaskRecord] = await run_in_threadpool(
        lambda: services.client.list_records(status=status, since=_moment(since, "since"), limit=limit + 1,
                                             tenant=scope, before=_decode_cursor(cursor)))
    page, more = records[:limit], len(records) > limit
    return {"tasks": [record.summary() for record in page],
            "next_cursor": _encode_cursor(page[-1]) if more and page else None}


async def get_task(task_id: str, request: Request, principal: Caller) -> dict[str, Any]:
    """The task's record, with its callback delivery (`callback`, null without one) and, while flow
    control holds it back, `waiting`: {reason, wait_s, since}."""
    services = _services(request)
    out = (await _record(services, principal, task_id)).to_dict()
    delivery = await run_in_threadpool(services.client.store.task_callback, task_id)
    out["callback"] = delivery.to_dict() if delivery else None
    out["waiting"] = None
    if out["status"] in ("queued", "running"):  # the wait reason and estimate the limiter keeps in Redis
        out["waiting"] = await run_in_threadpool(_waiting, services, task_id)
    return out


def _waiting(services: Services, task_id: str) -> dict[str, Any] | None:
    try:
        return read_waiting(services.client.redis, task_id)
    except redis.RedisError:
        return None


async def cancel_task(task_id: str, request: Request, principal: Caller) -> JSONResponse:
    """Stop a queued or running task (202), or say it had already finished (200)."""
    services = _services(request)
    await _record(services, principal, task_id)
    try:
        requested = await run_in_threadpool(services.client.cancel, task_id)
    except KeyError:
        raise _not_found(task_id) from None
    record = await _record(services, principal, task_id)
    return JSONResponse({"task_id": task_id, "cancel_requested": requested, "status": record.status},
                        status_code=202 if requested else 200)


async def retry_task(task_id: str, request: Request, principal: Caller) -> JSONResponse:
    """Queue a failed or cancelled task again (same id, a new run); 409 for any other status.

    `from_seq` is where its events continue: GET .../events?from_seq=<it>."""
    services = _services(request)
    await _record(services, principal, task_id)
    try:
        from_seq = await run_in_threadpool(services.client.retry, task_id)
    except KeyError:
        raise _not_found(task_id) from None
    except RequestError as exc:
        raise ApiError(409, exc.code, exc.message, field=exc.field) from None
    return JSONResponse({"task_id": task_id, "from_seq": from_seq}, status_code=202)


async def task_events(
    task_id: str, request: Request, principal: Annotated[Principal, Depends(viewer)],
    from_seq: Annotated[int, Query(ge=0, description="only events after this seq")] = 0,
    last_event_id: Annotated[str, Header(pattern=r"^\s*[0-9]{0,18}\s*$")] = "",
) -> Response:
    """Server-Sent Events: the log replayed after max(from_seq, Last-Event-ID), then live."""
    services = _services(request)
    record = await _record(services, principal, task_id)
    start = max(from_seq, _parse_last_event_id(last_event_id))
    hub: FanoutHub = request.app.state.fanout
    try:  # on the hub's bounded pool: viewers come by the thousand
        last, known = await hub.bus.last_event(task_id), True
    except RECONNECTABLE:  # Redis is away: the stream waits for it, or ends with the row's outcome
        last, known = None, False
    if known and last is None and record.is_terminal:
        raise ApiError(410, "events.expired",
                       f"the events of task {task_id} have expired (QVQ_EVENT_TTL_S); "
                       f"GET /v1/tasks/{task_id} has its result")
    if last is not None and ev.is_terminal(last) and start >= last["seq"]:
        return Response(status_code=204)  # nothing more will come; tells EventSource to stop
    return StreamingResponse(
        sse_stream(services.aclient, task_id, start, services.keepalive_s, hub=hub),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"},
    )


async def get_usage(
    request: Request, principal: Caller,
    by: Annotated[Literal["model", "tenant", "day"], Query()] = "model",
    since: Annotated[str | None, Query(description="inclusive; " + schemas.DATETIME_DESCRIPTION,
                                       json_schema_extra={"format": "date-time"})] = None,
    until: Annotated[str | None, Query(description="exclusive; " + schemas.DATETIME_DESCRIPTION,
                                       json_schema_extra={"format": "date-time"})] = None,
    tenant: Annotated[str | None, Query(pattern=schemas.SAFE_ID_PATTERN, description="admin keys only")] = None,
) -> dict[str, Any]:
    """Tokens and cost (CNY, exact decimals) of the caller's tenant, grouped."""
    services = _services(request)
    scope = _tenant_filter(principal, tenant)
    rows = await run_in_threadpool(lambda: services.client.store.usage_summary(
        by, tenant=scope, since=_moment(since, "since"), until=_moment(until, "until")))
    counts = ("calls", "estimated_calls", "prompt_tokens", "completion_tokens", "total_tokens")
    out: list[dict[str, Any]] = [
        {by: None if row[by] is None else str(row[by]), **{name: int(row.get(name) or 0) for name in counts},
         "cost_cny": str(Decimal(row["cost_cny"] or 0))} for row in rows]
    total: dict[str, Any] = {name: sum(r[name] for r in out) for name in counts}
    total["cost_cny"] = str(sum((Decimal(r["cost_cny"]) for r in out), Decimal(0)))
    return {"rows": out, "total": total}


# -- submitting --------------------------------------------------------------------------------
async def _submit(services: Services, principal: Principal, body: dict[str, Any]) -> JSONResponse:
    if principal.tenant is not None:
        named = body.get("tenant")
        if named is not None and named != principal.tenant:
            raise ApiError(403, "auth.forbidden", f"this key submits for tenant {principal.tenant!r} only",
                           field="tenant")
        body = {**body, "tenant": principal.tenant}
    try:
        handle = await run_in_threadpool(lambda: services.client.submit_request(body, local_files=False))
    except TaskIdTaken as exc:
        raise ApiError(409, exc.code, exc.message, field=exc.field) from None
    except RequestError as exc:
        status = 404 if exc.code in {"conversation.not_found", "image.not_found"} else 422
        raise ApiError(status, exc.code, exc.message, field=exc.field) from None
    except EnqueueError as exc:
        log.error("api.enqueue_failed", error=exc.detail or exc.message)
        raise ApiError(503, "unavailable", exc.message) from None
    return JSONResponse({"task_id": handle.task_id, "created": handle.created},
                        status_code=202 if handle.created else 200,
                        headers={"Location": f"/v1/tasks/{handle.task_id}"})


async def _store_upload(services: Services, principal: Principal, file: UploadFile, field: str) -> Any:
    limit = services.settings.max_image_bytes
    data = await file.read(limit + 1)
    name = (file.filename or "upload")[:200]
    if len(data) > limit:
        raise ApiError(413, "image.too_large", f"{name}: larger than {limit / 1048576:g} MB", field=field)
    if not data:
        raise ApiError(422, "request.invalid", f"{name}: empty file", field=field)
    format_ = sniff_format(data)
    if format_ is None:
        raise ApiError(422, "image.unsupported_format",
                       f"{name}: not an image this service accepts (BMP, JPEG, PNG, TIFF, WEBP, HEIC)", field=field)
    upload_id = uuid.uuid4().hex
    await run_in_threadpool(services.uploads.put, upload_id, data, f"image/{format_.lower()}")
    return await run_in_threadpool(lambda: services.client.store.add_upload(
        upload_id, tenant=principal.tenant, filename=name, format_=format_, size=len(data),
        ttl_s=services.settings.upload_ttl_s))


def _only_fields(form: Any, allowed: set[str]) -> None:
    unknown = sorted(set(form.keys()) - allowed)
    if unknown:
        raise ApiError(422, "request.invalid", f"unknown form field(s) {', '.join(map(repr, unknown))}",
                       field=unknown[0][:64])


def _form_text(value: Any, field: str, *, required: bool = True) -> str:
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise ApiError(422, "request.invalid", f"{field}: a text field is required", field=field)
    return value


def _delete_upload(services: Services, upload_id: str) -> None:
    services.uploads.delete(upload_id)
    services.client.store.delete_upload(upload_id)


async def _sweep_uploads(services: Services) -> None:
    """Delete uploads past their retention (QVQ_UPLOAD_TTL_S), for as long as the API runs."""
    while True:
        try:
            expired = await run_in_threadpool(services.client.store.expired_uploads)
            for upload in expired:
                await run_in_threadpool(_delete_upload, services, upload.id)
            if expired:
                log.info("uploads.expired_deleted", count=len(expired))
        except Exception as exc:  # the next round tries again
            log.warning("uploads.sweep_failed", error=type(exc).__name__)
        await asyncio.sleep(min(UPLOAD_SWEEP_S, max(1.0, services.settings.upload_ttl_s / 4)))


# -- events ------------------------------------------------------------------------------------
async def sse_stream(aclient: AsyncClient, task_id: str, from_seq: int,
                     keepalive_s: float = KEEPALIVE_S, *, hub: FanoutHub | None = None) -> AsyncIterator[str]:
    """The task's events as SSE frames (`id: seq`, `event: type`, `data: json`), a keep-alive
    comment after each `keepalive_s` without an event, ending after the terminal event of the
    task's latest run (made from the row when it never reached Redis; the row is read while quiet).

    With `hub` (producer/fanout.py), live messages come from the process's one pub/sub connection
    and the viewers of a task share their row reads; without it, the stream has a connection of its own."""
    yield f"retry: {SSE_RETRY_MS}\n\n"
    # The subscription itself says when keepalive_s passed without an event (None): no timed wait
    # around each event, which thousands of viewers would pay for on every event.
    if hub is None:
        events = aclient.bus.heartbeats(task_id, from_seq, heartbeat_s=keepalive_s, row=aclient.row)
    else:
        events = hub.heartbeats(task_id, from_seq, heartbeat_s=keepalive_s, row=hub.row_reader(aclient.row))
    try:
        # No return at a terminal event: an earlier run's is followed by the next run; the
        # subscription ends after the latest run's.
        async for event in events:
            if event is None:
                yield ": keep-alive\n\n"
            else:
                yield format_sse(event) if hub is None else hub.frame(event, format_sse)
    except Exception:
        log.exception("sse.failed", task_id=task_id)  # the client reconnects with Last-Event-ID
    finally:
        # Runs on a client disconnect too (the request is cancelled): release the subscription.
        with anyio.move_on_after(5, shield=True):
            await events.aclose()


def format_sse(event: dict[str, Any]) -> str:
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    return f"id: {event['seq']}\nevent: {event['type']}\ndata: {data}\n\n"


# -- helpers -----------------------------------------------------------------------------------
def _services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


async def _record(services: Services, principal: Principal, task_id: str) -> TaskRecord:
    """The task's row, if this principal may see it; otherwise exactly what a missing task answers."""
    try:
        record = await services.aclient.get(task_id)
    except KeyError:
        raise _not_found(task_id) from None
    if not principal.may_see(record.tenant):
        raise _not_found(task_id)
    return record


def _not_found(task_id: str) -> ApiError:
    shown = task_id if len(task_id) <= 128 else task_id[:128] + "..."
    return ApiError(404, "task.not_found", f"no task {shown!r}", field="task_id")


def _tenant_filter(principal: Principal, tenant: str | None) -> Any:
    """Which tenant's rows a listing shows: the key's own; an admin's choice (every tenant by default)."""
    if principal.tenant is None:
        return ANY_TENANT if tenant is None else tenant
    if tenant is not None and tenant != principal.tenant:
        raise ApiError(403, "auth.forbidden", f"this key reads tenant {principal.tenant!r} only", field="tenant")
    return principal.tenant


def _encode_cursor(record: TaskRecord) -> str:
    raw = json.dumps([record.created_at.isoformat(), record.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str | None) -> tuple[dt.datetime, str] | None:
    if not cursor:
        return None
    try:
        created, task_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        return _aware(dt.datetime.fromisoformat(created)), str(task_id)  # type: ignore[return-value]
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise ApiError(400, "request.invalid", "the cursor is not one this API returned", field="cursor") from None


def _moment(value: str | None, field: str) -> dt.datetime | None:
    """An RFC 3339 date-time query parameter (a bare number is refused, not taken as a timestamp)."""
    if value is None:
        return None
    try:
        if not re.match(r"^\d{4}-\d{2}-\d{2}", value):
            raise ValueError(value)
        return _aware(dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00")))
    except ValueError:
        raise ApiError(422, "request.invalid", f"{field}: expected a date-time like 2026-12-01T00:00:00Z",
                       field=field) from None


def _aware(moment: dt.datetime | None) -> dt.datetime | None:
    if moment is None:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _parse_last_event_id(value: str | None) -> int:
    if not value or not value.strip():
        return 0
    try:
        return max(0, int(value.strip()))
    except ValueError:
        raise ApiError(400, "request.invalid", "Last-Event-ID must be a seq (an integer)",
                       field="Last-Event-ID") from None


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.field, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part not in {"body", "query", "header", "path"}]
        field = ".".join(location) or None
        message = f"{field}: {first.get('msg', 'invalid')}" if field else str(first.get("msg", "invalid request"))
        return error_response(422, "request.invalid", message, field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "request.invalid" if exc.status_code < 500 else "internal"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:  # every method of the path, not only those of the first route matched
            headers["Allow"] = ", ".join(_allowed_methods(request))
        return error_response(exc.status_code, code, str(exc.detail), headers=headers or None)

    async def unavailable(_request: Request, exc: Exception) -> JSONResponse:
        log.error("api.dependency_unavailable", error=type(exc).__name__, detail=str(exc))
        return error_response(503, "unavailable", UNAVAILABLE)

    async def internal(_request: Request, exc: Exception) -> JSONResponse:
        error_id = uuid.uuid4().hex[:12]
        log.error("api.internal_error", error_id=error_id, error=type(exc).__name__, exc_info=exc)
        return error_response(500, "internal", f"an internal error occurred (error id {error_id})")

    app.add_exception_handler(Exception, internal)
    app.add_exception_handler(sa.exc.OperationalError, unavailable)
    app.add_exception_handler(sa.exc.InterfaceError, unavailable)
    app.add_exception_handler(sa.exc.TimeoutError, unavailable)
    app.add_exception_handler(redis.RedisError, unavailable)
    app.add_exception_handler(OSError, unavailable)


def _allowed_methods(request: Request) -> list[str]:
    methods: set[str] = set()
    for route in request.app.router.routes:
        match, _ = route.matches({**request.scope, "method": "GET"})
        if match != Match.NONE or route.matches({**request.scope, "method": "POST"})[0] != Match.NONE:
            methods.update(getattr(route, "methods", None) or ())
    return sorted(methods)


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, with the job request's schema and the error shape FastAPI cannot infer."""
    if app.openapi_schema:
        return app.openapi_schema
    document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                           description="Visual-reasoning jobs on Alibaba QVQ: submit, watch live, get the result.")
    components = document.setdefault("components", {}).setdefault("schemas", {})
    for model in (schemas.JobRequestBody, schemas.ErrorBody):
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        components.update(schema.pop("$defs", {}))
        components[model.__name__] = schema
    _replace_fastapi_errors(document)
    document["components"].setdefault("securitySchemes", {})["webhook_signature"] = {
        "type": "apiKey", "in": "header", "name": "X-Qvq-Signature",
        "description": 't=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>"> with QVQ_WEBHOOK_SECRET(S)'}
    signed = document.get("paths", {}).get("/v1/webhooks/jobs", {}).get("post")
    if signed is not None:
        signed["security"] = [{"webhook_signature": []}]
    app.openapi_schema = document
    return document


def _replace_fastapi_errors(document: dict[str, Any]) -> None:
    """FastAPI documents its own {"detail": [...]} 422 on routes with parameters; this API answers
    every error as ErrorBody instead."""
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
    for path in document.get("paths", {}).values():
        for operation in path.values():
            response = operation.get("responses", {}).get("422")
            if response and "HTTPValidationError" in json.dumps(response):
                operation["responses"]["422"] = {"description": "a field is invalid (request.invalid)", **error}
    for name in ("HTTPValidationError", "ValidationError"):
        document.get("components", {}).get("schemas", {}).pop(name, None)


class _RedactApiKey(logging.Filter):
    """Keeps ?api_key= out of the access log (secrets never appear in logs)."""

    pattern = re.compile(r"(api_key=)[^&\s]+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.pattern.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def _redact_access_log() -> None:
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, _RedactApiKey) for f in logger.filters):
        logger.addFilter(_RedactApiKey())


async def _check(awaitable: Any) -> bool:
    try:
        with anyio.fail_after(3):
            await awaitable
        return True
    except Exception:
        return False


def _ping_database(store: Store) -> None:
    with store.engine.connect() as conn:
        conn.execute(sa.text("select 1"))
