"""AsyncHttpClient: the AsyncTaskClient surface over the HTTP API.

As AsyncClient shares the direct client's code, this shares HttpClient's: its short calls (submit, get,
cancel, retry, listings) run HttpClient's methods in a worker thread (one implementation); only the event
stream, which may stay open for minutes, is read natively on the event loop (httpx.AsyncClient), with the
same I/O-free core (core.Follow) as the sync one.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from producer.http_client.core import DROPPED, TIMEOUT, Follow, HttpTaskRecord
from producer.http_client.sync import HttpClient
from producer.protocol import AsyncTaskHandle
from producer.results import await_result


class AsyncHttpClient:
    """HttpClient's surface, awaited."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 http: httpx.AsyncClient | None = None) -> None:
        self.sync = HttpClient(base_url, api_key)
        self.core = self.sync.core
        self.http = http or httpx.AsyncClient(base_url=self.core.base_url, headers=self.core.headers(),
                                              timeout=TIMEOUT)

    async def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
                     **fields_: Any) -> AsyncTaskHandle[AsyncHttpClient]:
        handle = await asyncio.to_thread(self.sync.submit, images, prompt, model, **fields_)
        return AsyncTaskHandle(handle.task_id, handle.created, self)

    async def submit_request(self, request: dict[str, Any]) -> AsyncTaskHandle[AsyncHttpClient]:
        handle = await asyncio.to_thread(self.sync.submit_request, request)
        return AsyncTaskHandle(handle.task_id, handle.created, self)

    async def cancel(self, task_id: str) -> bool:
        return await asyncio.to_thread(self.sync.cancel, task_id)

    async def retry(self, task_id: str) -> int:
        return await asyncio.to_thread(self.sync.retry, task_id)

    async def get(self, task_id: str) -> HttpTaskRecord:
        return await asyncio.to_thread(self.sync.get, task_id)

    async def redeliver_callback(self, task_id: str) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.redeliver_callback, task_id)

    async def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
                    tenant: str | None = None) -> list[dict[str, Any]]:
        return await asyncio.to_thread(self.sync.tasks, status=status, since=since, limit=limit, tenant=tenant)

    async def usage(self, by: str = "model", *, since: dt.datetime | None = None,
                    until: dt.datetime | None = None, tenant: str | None = None) -> dict[str, Any]:
        return await asyncio.to_thread(self.sync.usage, by, since=since, until=until, tenant=tenant)

    async def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
                     idle_timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        """As HttpClient.events, without holding a thread while it waits."""
        state = Follow(task_id, from_seq, timeout, idle_timeout)
        while True:
            state.check_time()
            ended = [0]
            try:
                async for event in self._stream(state, ended):
                    yield event
            except DROPPED as exc:
                state.dropped(exc)
            if state.ended(ended[0]):
                return
            await asyncio.sleep(state.next_delay())

    follow = events

    async def _stream(self, state: Follow, ended: list[int]) -> AsyncIterator[dict[str, Any]]:
        """One connection's events; `ended[0]` is set to the status it closed with."""
        call = state.call()
        async with self.http.stream(call.method, call.path, params=call.params, headers=call.headers,
                                    timeout=state.timeout()) as response:
            ended[0] = response.status_code
            if response.status_code != 200:
                self.core.opened(response.status_code, await response.aread())
                return
            async for chunk in response.aiter_bytes():
                for event in state.feed(chunk):
                    yield event

    async def result(self, task_id: str, timeout: float | None = None) -> HttpTaskRecord:
        return await await_result(self, task_id, timeout)  # type: ignore[return-value]

    async def aclose(self) -> None:
        await self.http.aclose()
        await asyncio.to_thread(self.sync.close)

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
