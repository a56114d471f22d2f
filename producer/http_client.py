"""The HTTP-only client: the surface of producer.client.Client over the HTTP API, needing nothing but
QVQ_API_URL and QVQ_API_KEY (no Redis or database credentials).

    with HttpClient() as client:                       # or HttpClient("https://qvq.example", "key")
        handle = client.submit(images=["s3://bucket/photo.jpg"], prompt="What is wrong here?")
        for event in handle.events():                  # SSE; a dropped connection resumes (Last-Event-ID)
            ...
        record = handle.result(timeout=300)

    async with AsyncHttpClient() as client:            # the same, awaited
        handle = await client.submit(...)
        async for event in client.events(handle.task_id): ...

Sync and async share one I/O-free core (`_Core`: requests built, answers mapped to records or errors,
SSE parsed, where to resume); the two drivers only move bytes (httpx.Client, httpx.AsyncClient).
Local image paths are uploaded first (POST /v1/uploads) and sent as their upload:// references.

Errors (contracts/errors.py): 422/409 -> RequestError (with `field`), 401/403 -> AuthError, 404 ->
NotFoundError (also a KeyError, as Client.get raises), 503 or no answer -> UnavailableError, others ->
ApiCallError; waiting too long -> TimeoutError.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import mimetypes
import time
from collections.abc import AsyncIterator, Generator, Iterator, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from contracts import events as ev
from contracts.errors import ApiCallError, AuthError, NotFoundError, RequestError, UnavailableError
from contracts.settings import get_settings
from contracts.store import AnyTenant, TaskRecord
from producer.client import TaskHandle

RECONNECT_DELAYS_S = (0.1, 0.3, 1.0, 2.0, 3.0)  # between SSE reconnects without progress; then give up
RESULT_RECHECK_S = 5.0
TIMEOUT = httpx.Timeout(30.0, connect=10.0)


@dataclass(frozen=True)
class HttpTaskRecord(TaskRecord):
    """A task's record as the API shows it, with its callback delivery."""

    callback: dict[str, Any] | None = None


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    headers: dict[str, str] = field(default_factory=dict)


# -- the I/O-free core ---------------------------------------------------------------------------
class _Core:
    """Builds every request, maps every answer; knows nothing of sockets."""

    def __init__(self, base_url: str | None, api_key: str | None) -> None:
        settings = get_settings() if base_url is None or api_key is None else None
        self.base_url = (base_url or (settings.api_url if settings else "") or "http://127.0.0.1:8000").rstrip("/")
        self.api_key = api_key if api_key is not None else (settings.api_key if settings else "")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @staticmethod
    def submit(request: dict[str, Any]) -> Call:
        return Call("POST", "/v1/tasks", json=request)

    @staticmethod
    def job(images: Sequence[str], prompt: str, model: str | None, fields_: dict[str, Any]) -> dict[str, Any]:
        request = {"images": list(images), "prompt": prompt, **fields_}
        if model is not None:
            request["model"] = model
        return request

    @staticmethod
    def local_paths(images: Sequence[str]) -> list[tuple[int, Path]]:
        """Which references are files on this machine, to upload first."""
        return [(index, Path(ref).expanduser()) for index, ref in enumerate(images) if "://" not in ref]

    @staticmethod
    def upload_files(path: Path) -> dict[str, Any]:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return {"file": (path.name, path.read_bytes(), kind)}

    @staticmethod
    def get(task_id: str) -> Call:
        return Call("GET", _task_path(task_id, ""))

    @staticmethod
    def cancel(task_id: str) -> Call:
        return Call("POST", _task_path(task_id, "/cancel"))

    @staticmethod
    def retry(task_id: str) -> Call:
        return Call("POST", _task_path(task_id, "/retry"))

    @staticmethod
    def redeliver(task_id: str) -> Call:
        return Call("POST", _task_path(task_id, "/callback/redeliver"))

    @staticmethod
    def tasks(status: str | None, since: dt.datetime | None, limit: int, tenant: str | None,
              cursor: str | None) -> Call:
        params = {"status": status, "since": since.isoformat() if since else None, "limit": min(limit, 500),
                  "tenant": tenant, "cursor": cursor}
        return Call("GET", "/v1/tasks", params={k: v for k, v in params.items() if v is not None})

    @staticmethod
    def usage(by: str, since: dt.datetime | None, until: dt.datetime | None, tenant: str | None) -> Call:
        params = {"by": by, "since": since.isoformat() if since else None,
                  "until": until.isoformat() if until else None, "tenant": tenant}
        return Call("GET", "/v1/usage", params={k: v for k, v in params.items() if v is not None})

    @staticmethod
    def events(task_id: str, after: int) -> Call:
        return Call("GET", _task_path(task_id, "/events"), params={"from_seq": after},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(after)})

    # -- answers -----------------------------------------------------------------------------
    @staticmethod
    def answer(status: int, body: bytes) -> Any:
        """The JSON of a 2xx answer; the mapped error otherwise."""
        try:
            data = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if 200 <= status < 300:
            return data
        raise error_for(status, data)

    @staticmethod
    def record(data: dict[str, Any]) -> HttpTaskRecord:
        values: dict[str, Any] = {f.name: data.get(f.name) for f in fields(HttpTaskRecord)}
        values["id"] = data["task_id"]
        values["request"] = data.get("request") or {}
        values["attempts"] = data.get("attempts") or 0
        for name in ("retry_base", "run", "last_seq"):
            values[name] = data.get(name) or 0
        for name in ("created_at", "started_at", "finished_at"):
            values[name] = dt.datetime.fromisoformat(data[name]) if data.get(name) else None
        return HttpTaskRecord(**values)


def error_for(status: int, data: Any) -> Exception:
    """Our error for an API error answer ({"error": {"code", "message", "field"}})."""
    detail: dict[str, Any] = data["error"] if isinstance(data, dict) and isinstance(data.get("error"), dict) else {}
    code, message, field_ = detail.get("code"), str(detail.get("message") or f"HTTP {status}"), detail.get("field")
    if status in (409, 422) or (status == 400 and code == "request.invalid"):
        error = RequestError(message, field=field_, code=code if code in ("model.unknown", "request.invalid") else None)
        error.message = message  # the API's message names the field already
        error.args = (message,)
        return error
    if status == 404 and code == "conversation.not_found":
        return RequestError(message, field=field_, code=code)
    kind = {401: AuthError, 403: AuthError, 404: NotFoundError, 503: UnavailableError}.get(status, ApiCallError)
    return kind(message, code=code, status=status, field=field_)


class SseDecoder:
    """Server-Sent Events, line by line: `feed(line)` returns a finished event's JSON (or None)."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: str) -> dict[str, Any] | None:
        if line == "":
            data, self._data = self._data, []
            return json.loads("\n".join(data)) if data else None  # type: ignore[no-any-return]
        if line.startswith("data:"):
            self._data.append(line[5:].lstrip(" ") if line[5:6] == " " else line[5:])
        return None  # comments (keep-alives), id:, event:, retry: carry nothing we need beyond data


class Follow:
    """Where a followed stream stands: the last seq seen, whether it ended, when to give up."""

    def __init__(self, task_id: str, from_seq: int, timeout: float | None, idle_timeout: float | None) -> None:
        self.task_id, self.last = task_id, from_seq
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.idle_timeout = idle_timeout
        self.last_event_at = time.monotonic()
        self.done = False
        self.failures = 0
        self.terminal_seen = False

    def accept(self, event: dict[str, Any]) -> bool:
        """True when the event is new (seq after the last one); replays after a reconnect are dropped."""
        self.last_event_at = time.monotonic()
        if int(event.get("seq", 0)) <= self.last:
            return False
        self.last = int(event["seq"])
        self.terminal_seen = ev.is_terminal(event)
        self.failures = 0
        return True

    def read_timeout(self) -> float | None:
        """How long one read may wait: until the overall or the idle deadline."""
        limits = [limit for limit in (self.remaining(), self.idle_left()) if limit is not None]
        return max(0.01, min(limits)) if limits else None

    def remaining(self) -> float | None:
        return None if self.deadline is None else self.deadline - time.monotonic()

    def idle_left(self) -> float | None:
        return None if self.idle_timeout is None else self.idle_timeout - (time.monotonic() - self.last_event_at)

    def check_time(self) -> None:
        remaining, idle = self.remaining(), self.idle_left()
        if remaining is not None and remaining <= 0:
            raise TimeoutError(f"task {self.task_id}: no end within the timeout")
        if idle is not None and idle <= 0:
            raise TimeoutError(f"task {self.task_id}: no event for {self.idle_timeout:g} s")

    def ended(self, status: int) -> bool:
        """After a stream closed (or answered `status`): True when nothing more will come."""
        return status == 204 or self.terminal_seen

    def next_delay(self) -> float:
        """The pause before reconnecting; UnavailableError after too many without progress."""
        if self.failures >= len(RECONNECT_DELAYS_S):
            raise UnavailableError(f"task {self.task_id}: the event stream kept dropping", status=0)
        delay = RECONNECT_DELAYS_S[self.failures]
        self.failures += 1
        return delay


def _unreachable(exc: Exception) -> UnavailableError:
    return UnavailableError(f"the API cannot be reached ({type(exc).__name__})", status=0)


# -- the sync driver -----------------------------------------------------------------------------
class HttpClient:
    """producer.client.Client's surface over the HTTP API (synchronous)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 http: httpx.Client | None = None) -> None:
        self.core = _Core(base_url, api_key)
        self.http = http or httpx.Client(base_url=self.core.base_url, headers=self.core.headers(), timeout=TIMEOUT)

    def _call(self, call: Call, **extra: Any) -> Any:
        try:
            response = self.http.request(call.method, call.path, params=call.params, json=call.json,
                                         headers=call.headers, **extra)
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc
        return self.core.answer(response.status_code, response.content)

    # -- submit ----------------------------------------------------------------------------------
    def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
               **fields_: Any) -> TaskHandle[HttpClient]:
        refs = list(images)
        for index, path in self.core.local_paths(refs):
            refs[index] = self._call(Call("POST", "/v1/uploads"), files=self.core.upload_files(path))["ref"]
        return self.submit_request(self.core.job(refs, prompt, model, fields_))

    def submit_request(self, request: dict[str, Any], *, local_files: bool = False) -> TaskHandle[HttpClient]:
        created = self._call(self.core.submit(request))
        return TaskHandle(created["task_id"], bool(created["created"]), self)

    # -- read ------------------------------------------------------------------------------------
    def handle(self, task_id: str) -> TaskHandle[HttpClient]:
        self.get(task_id)
        return TaskHandle(task_id, False, self)

    def get(self, task_id: str) -> HttpTaskRecord:
        return self.core.record(self._call(self.core.get(task_id)))

    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Every event after from_seq, replayed then live, ending after the terminal one; a dropped
        connection is resumed from the last seq received (Last-Event-ID), no event twice."""
        state = Follow(task_id, from_seq, timeout, idle_timeout)
        while True:
            state.check_time()
            status = 0
            try:
                status = yield from self._stream(state)
            except (httpx.TransportError, httpx.StreamError) as exc:
                if isinstance(exc, httpx.TimeoutException):
                    state.check_time()
            if state.ended(status):
                return
            time.sleep(state.next_delay())

    follow = events

    def _stream(self, state: Follow) -> Generator[dict[str, Any], None, int]:
        call = self.core.events(state.task_id, state.last)
        decoder = SseDecoder()
        timeout = httpx.Timeout(30.0, connect=10.0, read=state.read_timeout())
        with self.http.stream(call.method, call.path, params=call.params, headers=call.headers,
                              timeout=timeout) as response:
            if response.status_code != 200:
                response.read()
                if response.status_code == 204:
                    return 204
                self.core.answer(response.status_code, response.content)
            for line in response.iter_lines():
                event = decoder.feed(line)
                if event is not None and state.accept(event):
                    yield event
                state.check_time()
        return 200

    def result(self, task_id: str, timeout: float | None = None) -> HttpTaskRecord:
        """Block until the task is terminal (or TimeoutError) and return its record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        record = self.get(task_id)
        after = max(0, record.last_seq - 1)
        while not record.is_terminal:
            wait = RESULT_RECHECK_S if deadline is None else min(RESULT_RECHECK_S, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"task {task_id} did not finish within {timeout:g} s")
            try:
                for event in self.events(task_id, from_seq=after, timeout=wait):
                    after = event["seq"]
            except TimeoutError:
                pass
            record = self.get(task_id)
        return record

    # -- act -------------------------------------------------------------------------------------
    def cancel(self, task_id: str) -> bool:
        return bool(self._call(self.core.cancel(task_id))["cancel_requested"])

    def retry(self, task_id: str) -> int:
        return int(self._call(self.core.retry(task_id))["from_seq"])

    def redeliver_callback(self, task_id: str) -> dict[str, Any]:
        return dict(self._call(self.core.redeliver(task_id)))

    def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
              tenant: str | None = None) -> list[dict[str, Any]]:
        """The caller's tasks, newest first (summaries), following the pages up to `limit`."""
        out: list[dict[str, Any]] = []
        cursor = None
        while len(out) < limit:
            page = self._call(self.core.tasks(status, since, limit - len(out), tenant, cursor))
            out += page["tasks"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        return out[:limit]

    def usage(self, by: str = "model", *, since: dt.datetime | None = None, until: dt.datetime | None = None,
              tenant: str | None = None) -> dict[str, Any]:
        return dict(self._call(self.core.usage(by, since, until, tenant)))

    @property
    def store(self) -> _StoreView:
        """The reports the `qvq` commands read from the store, over HTTP."""
        return _StoreView(self)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _StoreView:
    def __init__(self, client: HttpClient) -> None:
        self.client = client

    def usage_summary(self, by: str = "model", **kwargs: Any) -> list[dict[str, Any]]:
        if isinstance(kwargs.get("tenant"), AnyTenant):  # every tenant the key may see: the API's default
            kwargs["tenant"] = None
        return list(self.client.usage(by, **kwargs)["rows"])

    def list_tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
                   **_: Any) -> list[HttpTaskRecord]:
        return [self.client.get(row["task_id"]) for row in self.client.tasks(status=status, since=since, limit=limit)]


# -- the async driver ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AsyncHttpTaskHandle:
    task_id: str
    created: bool
    client: AsyncHttpClient

    def events(self, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        return self.client.events(self.task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout)

    async def result(self, timeout: float | None = None) -> HttpTaskRecord:
        return await self.client.result(self.task_id, timeout=timeout)

    async def status(self) -> str:
        return (await self.client.get(self.task_id)).status

    async def cancel(self) -> bool:
        return await self.client.cancel(self.task_id)

    async def retry(self) -> int:
        return await self.client.retry(self.task_id)


class AsyncHttpClient:
    """HttpClient's surface, awaited (httpx.AsyncClient)."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 http: httpx.AsyncClient | None = None) -> None:
        self.core = _Core(base_url, api_key)
        self.http = http or httpx.AsyncClient(base_url=self.core.base_url, headers=self.core.headers(),
                                              timeout=TIMEOUT)

    async def _call(self, call: Call, **extra: Any) -> Any:
        try:
            response = await self.http.request(call.method, call.path, params=call.params, json=call.json,
                                               headers=call.headers, **extra)
        except httpx.TransportError as exc:
            raise _unreachable(exc) from exc
        return self.core.answer(response.status_code, response.content)

    async def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
                     **fields_: Any) -> AsyncHttpTaskHandle:
        refs = list(images)
        for index, path in self.core.local_paths(refs):
            refs[index] = (await self._call(Call("POST", "/v1/uploads"), files=self.core.upload_files(path)))["ref"]
        return await self.submit_request(self.core.job(refs, prompt, model, fields_))

    async def submit_request(self, request: dict[str, Any], *, local_files: bool = False) -> AsyncHttpTaskHandle:
        created = await self._call(self.core.submit(request))
        return AsyncHttpTaskHandle(created["task_id"], bool(created["created"]), self)

    async def get(self, task_id: str) -> HttpTaskRecord:
        return self.core.record(await self._call(self.core.get(task_id)))

    async def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
                     idle_timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        state = Follow(task_id, from_seq, timeout, idle_timeout)
        while True:
            state.check_time()
            outcome: list[int] = [0]
            try:
                async for event in self._stream(state, outcome):
                    yield event
            except (httpx.TransportError, httpx.StreamError) as exc:
                if isinstance(exc, httpx.TimeoutException):
                    state.check_time()
            if state.ended(outcome[0]):
                return
            await asyncio.sleep(state.next_delay())

    follow = events

    async def _stream(self, state: Follow, outcome: list[int]) -> AsyncIterator[dict[str, Any]]:
        call = self.core.events(state.task_id, state.last)
        decoder = SseDecoder()
        timeout = httpx.Timeout(30.0, connect=10.0, read=state.read_timeout())
        async with self.http.stream(call.method, call.path, params=call.params, headers=call.headers,
                                    timeout=timeout) as response:
            if response.status_code != 200:
                await response.aread()
                if response.status_code == 204:
                    outcome[0] = 204
                    return
                self.core.answer(response.status_code, response.content)
            async for line in response.aiter_lines():
                event = decoder.feed(line)
                if event is not None and state.accept(event):
                    yield event
                state.check_time()
        outcome[0] = 200

    async def result(self, task_id: str, timeout: float | None = None) -> HttpTaskRecord:
        deadline = None if timeout is None else time.monotonic() + timeout
        record = await self.get(task_id)
        after = max(0, record.last_seq - 1)
        while not record.is_terminal:
            wait = RESULT_RECHECK_S if deadline is None else min(RESULT_RECHECK_S, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"task {task_id} did not finish within {timeout:g} s")
            try:
                async for event in self.events(task_id, from_seq=after, timeout=wait):
                    after = event["seq"]
            except TimeoutError:
                pass
            record = await self.get(task_id)
        return record

    async def cancel(self, task_id: str) -> bool:
        return bool((await self._call(self.core.cancel(task_id)))["cancel_requested"])

    async def retry(self, task_id: str) -> int:
        return int((await self._call(self.core.retry(task_id)))["from_seq"])

    async def redeliver_callback(self, task_id: str) -> dict[str, Any]:
        return dict(await self._call(self.core.redeliver(task_id)))

    async def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
                    tenant: str | None = None) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        cursor = None
        while len(out) < limit:
            page = await self._call(self.core.tasks(status, since, limit - len(out), tenant, cursor))
            out += page["tasks"]
            cursor = page["next_cursor"]
            if not cursor:
                break
        return out[:limit]

    async def usage(self, by: str = "model", *, since: dt.datetime | None = None,
                    until: dt.datetime | None = None, tenant: str | None = None) -> dict[str, Any]:
        return dict(await self._call(self.core.usage(by, since, until, tenant)))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _task_path(task_id: str, suffix: str = "") -> str:
    """A task's URL path; the id is escaped, so whatever a caller passes names one task, never another route."""
    return f"/v1/tasks/{quote(task_id, safe='')}{suffix}"
