"""The HTTP API: enqueue jobs, read their state, cancel them, watch their events live (SSE), and a web page.

    qvq api --port 8000                     # or: uvicorn --factory producer.api:create_app

| method + path | does |
|---|---|
| POST /v1/tasks | a JSON job request (design.md) -> 202 {"task_id", "created"} (200 when an idempotency key returned an earlier task) |
| POST /v1/tasks/upload | multipart: image file(s) + prompt (+ model, high_resolution) -> the same, the files saved locally and sent as file:// refs |
| GET /v1/tasks/{id} | the task's record |
| POST /v1/tasks/{id}/cancel | stop a queued or running task |
| POST /v1/tasks/{id}/retry | queue a failed or cancelled task again -> 202 {"task_id", "follow_from_seq"} |
| GET /v1/tasks/{id}/events | Server-Sent Events: replay + live, resumable (Last-Event-ID or ?from_seq=), ends after the terminal event |
| GET / | the web viewer; GET /healthz | liveness (Redis and the database) |

Errors are {"error": {"code", "message", "field"}}. With QVQ_API_KEYS set, /v1/* needs
`Authorization: Bearer <key>` or `?api_key=<key>` (EventSource cannot set headers).

Submitting, reading and cancelling use the synchronous client in the server's thread pool (short
calls); the SSE streams use the asyncio event bus, so a connected viewer costs a coroutine and a
Redis pub/sub connection, never a thread.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import shutil
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import anyio
import sqlalchemy as sa
from fastapi import APIRouter, Depends, FastAPI, File, Form, Header, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from contracts import events as ev
from contracts.bus import RECONNECTABLE
from contracts.errors import RequestError
from contracts.job import MAX_IMAGES
from contracts.logging import get_logger
from contracts.settings import Settings, get_settings
from contracts.store import Store
from producer.aio import AsyncClient
from producer.client import Client, EnqueueError
from producer.fanout import FanoutHub

log = get_logger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
KEEPALIVE_S = 15.0
SSE_RETRY_MS = 3000  # how long a browser waits before reconnecting a dropped stream
MAX_UPLOAD_BYTES = 10 * 1024 * 1024  # per image, as the model service allows
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,5}$")


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


@dataclass
class Services:
    """What the routes use; built and closed by the app's lifespan."""

    settings: Settings
    client: Client
    aclient: AsyncClient
    upload_dir: Path
    keepalive_s: float


def create_app(settings: Settings | None = None, *, keepalive_s: float = KEEPALIVE_S,
               upload_dir: str | Path | None = None) -> FastAPI:
    """The API app. `keepalive_s`: seconds between SSE keep-alive comments; `upload_dir`: where
    POST /v1/tasks/upload saves images (default: a temporary directory removed at shutdown)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await run_in_threadpool(Store.from_url, settings.database_url)
        own_dir = upload_dir is None
        directory = Path(tempfile.mkdtemp(prefix="qvq-uploads-") if own_dir else upload_dir)  # type: ignore[arg-type]
        directory.mkdir(parents=True, exist_ok=True)
        services = Services(settings, Client(settings, store=store), AsyncClient(settings, store=store),
                            directory.resolve(), keepalive_s)
        app.state.services = services
        app.state.fanout = FanoutHub(settings.redis_url)  # one pub/sub connection for every SSE viewer
        try:
            yield
        finally:
            await app.state.fanout.aclose()
            await services.aclient.aclose()
            await run_in_threadpool(services.client.close)
            if own_dir:
                shutil.rmtree(directory, ignore_errors=True)

    app = FastAPI(title="qvq-queue", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    _install_error_handlers(app)
    _redact_access_log()
    app.include_router(_v1_router(settings), prefix="/v1")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/healthz")
    async def healthz(request: Request) -> JSONResponse:
        services: Services = request.app.state.services
        checks = {"redis": await _check(services.aclient.redis.ping()),
                  "database": await _check(run_in_threadpool(_ping_database, services.client.store))}
        healthy = all(checks.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", **checks},
                            status_code=200 if healthy else 503)

    return app


# -- /v1 ---------------------------------------------------------------------------------------
def _v1_router(settings: Settings) -> APIRouter:
    router = APIRouter(dependencies=[Depends(_key_checker(settings.api_keys))])
    router.add_api_route("/tasks", submit_task, methods=["POST"], status_code=202)
    router.add_api_route("/tasks/upload", upload_task, methods=["POST"], status_code=202)
    router.add_api_route("/tasks/{task_id}", get_task, methods=["GET"])
    router.add_api_route("/tasks/{task_id}/cancel", cancel_task, methods=["POST"])
    router.add_api_route("/tasks/{task_id}/retry", retry_task, methods=["POST"], status_code=202)
    router.add_api_route("/tasks/{task_id}/events", task_events, methods=["GET"],
                         response_class=StreamingResponse)
    return router


async def submit_task(request: Request) -> JSONResponse:
    """Enqueue a job request (JSON, as in design.md)."""
    try:
        body = json.loads(await request.body() or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "request.invalid", f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request.invalid", "the body must be a JSON object (a job request)")
    return await _submit(_services(request), body)


async def upload_task(
    request: Request,
    images: Annotated[list[UploadFile], File(description="one or more image files")],
    prompt: Annotated[str, Form()],
    model: Annotated[str | None, Form()] = None,
    high_resolution: Annotated[bool, Form()] = False,
) -> JSONResponse:
    """Enqueue a job for uploaded images (saved locally, sent to the worker as file:// refs)."""
    services = _services(request)
    if len(images) > MAX_IMAGES:
        raise ApiError(422, "request.invalid", f"at most {MAX_IMAGES} images per job", field="images")
    saved: list[Path] = []
    try:
        for index, image in enumerate(images):
            saved.append(await run_in_threadpool(_save_upload, image.file, image.filename,
                                                 services.upload_dir, f"images[{index}]"))
        body: dict[str, Any] = {"images": [path.as_uri() for path in saved], "prompt": prompt}
        if model:
            body["model"] = model
        if high_resolution:
            body["high_resolution"] = True
        return await _submit(services, body)
    except BaseException:
        for path in saved:
            path.unlink(missing_ok=True)
        raise


async def get_task(task_id: str, request: Request) -> dict[str, Any]:
    """The task's record."""
    return (await _record(_services(request), task_id)).to_dict()  # type: ignore[no-any-return]


async def cancel_task(task_id: str, request: Request) -> JSONResponse:
    """Stop a queued or running task (202), or say it had already finished (200)."""
    services = _services(request)
    try:
        requested = await run_in_threadpool(services.client.cancel, task_id)
    except KeyError:
        raise _not_found(task_id) from None
    record = await _record(services, task_id)
    return JSONResponse({"task_id": task_id, "cancel_requested": requested, "status": record.status},
                        status_code=202 if requested else 200)


async def task_events(
    task_id: str, request: Request,
    from_seq: Annotated[int, Query(ge=0, description="only events after this seq")] = 0,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    """Server-Sent Events: the log replayed after max(from_seq, Last-Event-ID), then live."""
    services = _services(request)
    record = await _record(services, task_id)
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


async def retry_task(task_id: str, request: Request) -> JSONResponse:
    """Queue a failed or cancelled task again (same id, a new attempt); 409 for any other status.

    `follow_from_seq` is where its events continue: GET .../events?from_seq=<it>."""
    services = _services(request)
    try:
        from_seq = await run_in_threadpool(services.client.retry, task_id)
    except KeyError:
        raise _not_found(task_id) from None
    except RequestError as exc:
        raise ApiError(409, exc.code, exc.message, field=exc.field) from None
    except EnqueueError as exc:
        raise ApiError(503, exc.code, exc.message) from None
    return JSONResponse({"task_id": task_id, "follow_from_seq": from_seq}, status_code=202)


async def _submit(services: Services, body: dict[str, Any]) -> JSONResponse:
    try:
        handle = await run_in_threadpool(services.client.submit_request, body)
    except RequestError as exc:
        raise ApiError(422, exc.code, exc.message, field=exc.field) from None
    except EnqueueError as exc:
        raise ApiError(503, exc.code, exc.message) from None
    return JSONResponse({"task_id": handle.task_id, "created": handle.created},
                        status_code=202 if handle.created else 200,
                        headers={"Location": f"/v1/tasks/{handle.task_id}"})


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


async def _record(services: Services, task_id: str) -> Any:
    try:
        return await services.aclient.get(task_id)
    except KeyError:
        raise _not_found(task_id) from None


def _not_found(task_id: str) -> ApiError:
    return ApiError(404, "task.not_found", f"no task {task_id!r}", field="task_id")


def _parse_last_event_id(value: str | None) -> int:
    if not value:
        return 0
    try:
        return max(0, int(value.strip()))
    except ValueError:
        raise ApiError(400, "request.invalid", f"Last-Event-ID must be a seq (an integer), got {value!r}",
                       field="Last-Event-ID") from None


def _save_upload(source: IO[bytes], filename: str | None, directory: Path, field: str) -> Path:
    """Copy one uploaded file under `directory` with a fresh name; at most MAX_UPLOAD_BYTES."""
    suffix = Path(filename or "").suffix
    target = directory / f"{uuid.uuid4().hex}{suffix.lower() if _SAFE_SUFFIX.match(suffix) else ''}"
    written = 0
    with target.open("wb") as out:
        while chunk := source.read(1 << 20):
            written += len(chunk)
            if written > MAX_UPLOAD_BYTES:
                out.close()
                target.unlink(missing_ok=True)
                raise ApiError(413, "image.too_large",
                               f"{filename or 'upload'}: larger than {MAX_UPLOAD_BYTES / 1048576:g} MB",
                               field=field)
            out.write(chunk)
    if written == 0:
        target.unlink(missing_ok=True)
        raise ApiError(422, "request.invalid", f"{filename or 'upload'}: empty file", field=field)
    return target


def _key_checker(keys: tuple[str, ...]) -> Any:
    expected = [key.encode() for key in keys]

    async def require_key(request: Request) -> None:
        if not expected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        supplied = token.strip() if scheme.lower() == "bearer" else request.query_params.get("api_key", "")
        challenge = {"WWW-Authenticate": "Bearer"}
        if not supplied:
            raise ApiError(401, "auth.required", "an API key is required: Authorization: Bearer <key> "
                           "(or ?api_key= for EventSource)", headers=challenge)
        matched = False
        for key in expected:  # every key compared, in constant time each
            matched |= hmac.compare_digest(key, supplied.encode())
        if not matched:
            raise ApiError(401, "auth.invalid", "the API key is not valid", headers=challenge)

    return require_key


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
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else "request.invalid" if exc.status_code < 500 else "internal"
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))


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
