"""HttpClient: the TaskClient surface over the HTTP API (httpx.Client); the decisions are core.py's."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import httpx

from contracts import tracing
from contracts.errors import RequestError
from producer.http_client.core import (
    DROPPED,
    TIMEOUT,
    BatchFollow,
    Call,
    Core,
    Follow,
    HttpTaskRecord,
    Pages,
    unreachable,
)
from producer.protocol import QueueView, TaskHandle
from producer.results import wait_for_result

#: A batch's submit lists and queues every item before it answers: minutes for a large prefix.
BATCH_SUBMIT_TIMEOUT = httpx.Timeout(600.0, connect=10.0)


class HttpClient:
    """The `qvq` command's and a backend's client when only QVQ_API_URL and QVQ_API_KEY are known."""

    uploads_local_files = True  # POST /v1/uploads, then their upload:// references

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 http: httpx.Client | None = None) -> None:
        self.core = Core(base_url, api_key)
        self.http = http or httpx.Client(base_url=self.core.base_url, headers=self.core.headers(), timeout=TIMEOUT)

    def _call(self, call: Call, **extra: Any) -> Any:
        try:
            response = self.http.request(call.method, call.path, params=call.params, json=call.json,
                                         headers=call.headers, **extra)
        except httpx.TransportError as exc:
            raise unreachable(exc) from exc
        return self.core.answer(response.status_code, response.content)

    # -- submit, cancel, retry -------------------------------------------------------------------
    def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
               **fields_: Any) -> TaskHandle[HttpClient]:
        """As Client.submit; local image files are uploaded first (POST /v1/uploads). The trace goes as the
        `traceparent` header."""
        trace = tracing.given(fields_)
        refs = list(images)
        for index, path in self.core.local_paths(refs):
            call, files = self.core.upload(path)
            refs[index] = self._call(call, files=files)["ref"]
        return self.submit_request(self.core.job(refs, prompt, model, fields_), trace=trace)

    def submit_request(self, request: dict[str, Any], *,
                       trace: tracing.Carrier | None = None) -> TaskHandle[HttpClient]:
        created = self._call(self.core.submit(request, trace or tracing.current()))
        return TaskHandle(created["task_id"], bool(created["created"]), self)

    def cancel(self, task_id: str) -> bool:
        return bool(self._call(self.core.cancel(task_id))["cancel_requested"])

    def retry(self, task_id: str) -> int:
        return int(self._call(self.core.retry(task_id))["from_seq"])

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
        return self._follow(Follow(task_id, from_seq, timeout, idle_timeout))

    follow = events

    def _follow(self, state: Follow) -> Iterator[dict[str, Any]]:
        while True:
            state.check_time()
            status = 0
            try:
                status = yield from self._stream(state)
            except DROPPED as exc:
                state.dropped(exc)
            if state.ended(status):
                return
            time.sleep(state.next_delay())

    def _stream(self, state: Follow) -> Generator[dict[str, Any], None, int]:
        call = state.call()
        with self.http.stream(call.method, call.path, params=call.params, headers=call.headers,
                              timeout=state.timeout()) as response:
            if response.status_code != 200:
                self.core.opened(response.status_code, response.read())
                return response.status_code
            for chunk in response.iter_bytes():
                yield from state.feed(chunk)
        return 200

    def result(self, task_id: str, timeout: float | None = None) -> HttpTaskRecord:
        """Block until the task is terminal (or WaitTimeout) and return its record."""
        return wait_for_result(self, task_id, timeout)  # type: ignore[return-value]

    def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
              tenant: str | None = None) -> list[dict[str, Any]]:
        """The caller's tasks, newest first (summaries), following the pages up to `limit`."""
        pages = Pages(status, since, limit, tenant)
        while not pages.done:
            pages.take(self._call(pages.next_call()))
        return pages.result()

    def usage(self, by: str = "model", *, since: dt.datetime | None = None, until: dt.datetime | None = None,
              tenant: str | None = None) -> dict[str, Any]:
        return dict(self._call(self.core.usage(by, since, until, tenant)))

    def limits(self) -> dict[str, Any]:
        return dict(self._call(self.core.limits()))

    def callback(self, task_id: str) -> dict[str, Any] | None:
        return self.get(task_id).callback

    def redeliver_callback(self, task_id: str) -> dict[str, Any]:
        return dict(self._call(self.core.redeliver(task_id)))

    def conversation_exists(self, conversation_id: str) -> bool:
        try:
            self._call(self.core.conversation(conversation_id))
        except RequestError as exc:
            if exc.code == "conversation.not_found":  # none of this key's tenant
                return False
            raise
        return True

    # -- batches -------------------------------------------------------------------------------
    def submit_batch(self, request: dict[str, Any]) -> dict[str, Any]:
        return dict(self._call(self.core.batch_submit(request), timeout=BATCH_SUBMIT_TIMEOUT))

    def batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._call(self.core.batch(batch_id)))

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._call(self.core.batch(batch_id, "cancel")))

    def retry_batch(self, batch_id: str) -> dict[str, Any]:
        return dict(self._call(self.core.batch(batch_id, "retry")))

    def batch_events(self, batch_id: str, from_seq: int = 0) -> Iterator[dict[str, Any]]:
        return self._follow(BatchFollow(batch_id, from_seq, None, None))

    def batch_results(self, batch_id: str, fmt: str = "jsonl") -> Iterator[str]:
        """The results as the API streams them (text as it arrives: a CSV answer may hold line breaks)."""
        call = self.core.batch_results(batch_id, fmt)
        try:
            with self.http.stream(call.method, call.path, params=call.params) as response:
                if response.status_code != 200:
                    self.core.answer(response.status_code, response.read())
                yield from response.iter_text()
        except httpx.TransportError as exc:
            raise unreachable(exc) from exc

    def queue_state(self) -> QueueView | None:
        """None: the broker is the API's, not this client's to look at."""
        return None

    def ping(self) -> None:
        """Nothing to check first: every call answers, or raises UnavailableError, on its own."""

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> HttpClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
