"""The HTTP clients' I/O-free core, as httpx keeps one under its sync and async clients: every request
built, every answer read (records, errors, pages), and a followed event stream's state. The drivers
(sync.py, aio.py) only move bytes.
"""

from __future__ import annotations

import datetime as dt
import json
import mimetypes
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from contracts import events as ev
from contracts import retry
from contracts.bus.sse import EventStreamDecoder
from contracts.errors import UnavailableError, WaitTimeout
from contracts.settings import get_settings
from contracts.store import TaskRecord
from producer.wire import error_from

TIMEOUT = httpx.Timeout(30.0, connect=10.0)
MAX_PAGE = 500
DEFAULT_URL = "http://127.0.0.1:8000"


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


def task_path(task_id: str, suffix: str = "") -> str:
    """A task's URL path; the id is escaped, so whatever a caller passes names one task, never another route."""
    return f"/v1/tasks/{quote(task_id, safe='')}{suffix}"


def batch_path(batch_id: str, suffix: str = "") -> str:
    return f"/v1/batches/{quote(batch_id, safe='')}{suffix}"


def _query(**params: Any) -> dict[str, Any]:
    return {name: value.isoformat() if isinstance(value, dt.datetime) else value
            for name, value in params.items() if value is not None}


class Core:
    """Builds every request, reads every answer; knows nothing of sockets."""

    def __init__(self, base_url: str | None, api_key: str | None) -> None:
        settings = get_settings() if base_url is None or api_key is None else None
        self.base_url = (base_url or (settings.api_url if settings else "") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else (settings.api_key if settings else "")

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    # -- requests ------------------------------------------------------------------------------
    @staticmethod
    def submit(request: dict[str, Any], trace: dict[str, str] | None = None) -> Call:
        return Call("POST", "/v1/tasks", json=request, headers=dict(trace or {}))

    @staticmethod
    def job(images: Sequence[str], prompt: str, model: str | None, fields_: dict[str, Any]) -> dict[str, Any]:
        request = {"images": list(images), "prompt": prompt, **fields_}
        if model is not None:
            request["model"] = model
        return request

    @staticmethod
    def local_paths(images: Sequence[str]) -> list[tuple[int, Path]]:
        """Which references are files on this machine, to upload first (POST /v1/uploads)."""
        return [(index, Path(ref.removeprefix("file://")).expanduser()) for index, ref in enumerate(images)
                if "://" not in ref or ref.startswith("file://")]

    @staticmethod
    def upload(path: Path) -> tuple[Call, dict[str, Any]]:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return Call("POST", "/v1/uploads"), {"file": (path.name, path.read_bytes(), kind)}

    @staticmethod
    def get(task_id: str) -> Call:
        return Call("GET", task_path(task_id))

    @staticmethod
    def cancel(task_id: str) -> Call:
        return Call("POST", task_path(task_id, "/cancel"))

    @staticmethod
    def retry(task_id: str) -> Call:
        return Call("POST", task_path(task_id, "/retry"))

    @staticmethod
    def redeliver(task_id: str) -> Call:
        return Call("POST", task_path(task_id, "/callback/redeliver"))

    @staticmethod
    def conversation(conversation_id: str) -> Call:
        return Call("GET", f"/v1/conversations/{quote(conversation_id, safe='')}")

    @staticmethod
    def usage(by: str, since: dt.datetime | None, until: dt.datetime | None, tenant: str | None) -> Call:
        return Call("GET", "/v1/usage", params=_query(by=by, since=since, until=until, tenant=tenant))

    @staticmethod
    def limits() -> Call:
        return Call("GET", "/v1/limits")

    @staticmethod
    def events(task_id: str, after: int) -> Call:
        return Call("GET", task_path(task_id, "/events"), params={"from_seq": after},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(after)})

    @staticmethod
    def batch_submit(request: dict[str, Any]) -> Call:
        return Call("POST", "/v1/batches", json=request)

    @staticmethod
    def batch(batch_id: str, action: str = "") -> Call:
        """GET the batch; with `action` ("cancel", "retry"), POST it."""
        return Call("POST" if action else "GET", batch_path(batch_id, f"/{action}" if action else ""))

    @staticmethod
    def batch_results(batch_id: str, fmt: str) -> Call:
        return Call("GET", batch_path(batch_id, "/results"), params={"format": fmt})

    # -- answers -------------------------------------------------------------------------------
    @staticmethod
    def answer(status: int, body: bytes) -> Any:
        """The JSON of a 2xx answer; the mapped error otherwise."""
        try:
            data = json.loads(body) if body else None
        except (ValueError, UnicodeDecodeError):
            data = None
        if 200 <= status < 300:
            return data
        raise error_from(status, data)

    @classmethod
    def opened(cls, status: int, body: bytes) -> None:
        """An event stream answered other than 200: 204 means nothing more will come (the follow ends);
        anything else raises its error."""
        if status != 204:
            cls.answer(status, body)

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


class Pages:
    """Following GET /v1/tasks's pages up to `limit` summaries."""

    def __init__(self, status: str | None, since: dt.datetime | None, limit: int, tenant: str | None) -> None:
        self.query = {"status": status, "since": since, "tenant": tenant}
        self.limit = limit
        self.found: list[dict[str, Any]] = []
        self.cursor: str | None = None
        self.done = limit <= 0

    def next_call(self) -> Call:
        size = min(MAX_PAGE, self.limit - len(self.found))
        return Call("GET", "/v1/tasks", params=_query(**self.query, limit=size, cursor=self.cursor))

    def take(self, page: dict[str, Any]) -> None:
        self.found += page["tasks"]
        self.cursor = page["next_cursor"]
        self.done = not self.cursor or len(self.found) >= self.limit

    def result(self) -> list[dict[str, Any]]:
        return self.found[:self.limit]


class Follow:
    """Where a followed event stream stands: the bytes decoded so far, the last seq seen, whether it
    ended, when to give up; a dropped connection resumes from the last seq (Last-Event-ID), no event twice."""

    ends_with: frozenset[str] = ev.TERMINAL_TYPES  # the events after which the follow ends

    def __init__(self, task_id: str, from_seq: int, timeout: float | None, idle_timeout: float | None) -> None:
        self.task_id, self.last = task_id, from_seq
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.idle_timeout = idle_timeout
        self.last_event_at = time.monotonic()
        self.failures = 0
        self.terminal_seen = False
        self.decoder = EventStreamDecoder()

    def call(self) -> Call:
        """The request of the next connection (from the last seq seen); a fresh decoder for it."""
        self.decoder = EventStreamDecoder()
        return Core.events(self.task_id, self.last)

    def timeout(self) -> httpx.Timeout:
        return httpx.Timeout(30.0, connect=10.0, read=self.read_timeout())

    def feed(self, chunk: bytes) -> list[dict[str, Any]]:
        """The new events completed by these bytes (replays after a reconnect are dropped)."""
        events = [event for data in self.decoder.feed(chunk) if self.accept(event := json.loads(data))]
        self.check_time()
        return events

    def accept(self, event: dict[str, Any]) -> bool:
        """True when the event is new (seq after the last one)."""
        self.last_event_at = time.monotonic()
        if int(event.get("seq", 0)) <= self.last:
            return False
        self.last = int(event["seq"])
        self.terminal_seen = event.get("type") in self.ends_with
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
            raise WaitTimeout(f"task {self.task_id}: no end within the timeout")
        if idle is not None and idle <= 0:
            raise WaitTimeout(f"task {self.task_id}: no event for {self.idle_timeout:g} s")

    def dropped(self, exc: Exception) -> None:
        """The connection failed or broke: a timeout of ours ends the follow, anything else reconnects."""
        if isinstance(exc, httpx.TimeoutException):
            self.check_time()

    def ended(self, status: int) -> bool:
        """After a stream closed (or answered `status`): True when nothing more will come."""
        return status == 204 or self.terminal_seen

    def next_delay(self) -> float:
        """The pause before reconnecting; UnavailableError after too many without progress."""
        delays = retry.SSE_RECONNECT.delays
        if self.failures >= len(delays):
            raise UnavailableError(f"task {self.task_id}: the event stream kept dropping", status=0)
        delay = delays[self.failures]
        self.failures += 1
        return delay


class BatchFollow(Follow):
    """A batch's event stream (GET /v1/batches/{id}/events), followed as a task's is: ends at batch.completed."""

    ends_with = frozenset({ev.BATCH_COMPLETED})

    def call(self) -> Call:
        self.decoder = EventStreamDecoder()
        return Call("GET", batch_path(self.task_id, "/events"), params={"from_seq": self.last},
                    headers={"Accept": "text/event-stream", "Last-Event-ID": str(self.last)})


def unreachable(exc: Exception) -> UnavailableError:
    return UnavailableError(f"the API cannot be reached ({type(exc).__name__})", status=0)


#: The errors after which a followed stream reconnects.
DROPPED = (httpx.TransportError, httpx.StreamError)
