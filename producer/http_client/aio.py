"""AsyncHttpClient: the AsyncTaskClient surface over the HTTP API (httpx.AsyncClient); the decisions are
core.py's, as HttpClient's are."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx

from producer.http_client.core import DROPPED, TIMEOUT, Call, Core, Follow, HttpTaskRecord, Pages, unreachable
from producer.protocol import AsyncTaskHandle
from producer.results import await_result


class AsyncHttpClient:
    """HttpClient's surface, awaited."""

    def __init__(self, base_url: str | None = None, api_key: str | None = None, *,
                 http: httpx.AsyncClient | None = None) -> None:
        self.core = Core(base_url, api_key)
        self.http = http or httpx.AsyncClient(base_url=self.core.base_url, headers=self.core.headers(),
                                              timeout=TIMEOUT)

    async def _call(self, call: Call, **extra: Any) -> Any:
        try:
            response = await self.http.request(call.method, call.path, params=call.params, json=call.json,
                                               headers=call.headers, **extra)
        except httpx.TransportError as exc:
            raise unreachable(exc) from exc
        return self.core.answer(response.status_code, response.content)

    async def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
                     **fields_: Any) -> AsyncTaskHandle[AsyncHttpClient]:
        refs = list(images)
        for index, path in self.core.local_paths(refs):
            call, files = self.core.upload(path)
            refs[index] = (await self._call(call, files=files))["ref"]
        return await self.submit_request(self.core.job(refs, prompt, model, fields_))

    async def submit_request(self, request: dict[str, Any]) -> AsyncTaskHandle[AsyncHttpClient]:
        created = await self._call(self.core.submit(request))
        return AsyncTaskHandle(created["task_id"], bool(created["created"]), self)

    async def cancel(self, task_id: str) -> bool:
        return bool((await self._call(self.core.cancel(task_id)))["cancel_requested"])

    async def retry(self, task_id: str) -> int:
        return int((await self._call(self.core.retry(task_id)))["from_seq"])

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
            except DROPPED as exc:
                state.dropped(exc)
            if state.ended(outcome[0]):
                return
            await asyncio.sleep(state.next_delay())

    follow = events

    async def _stream(self, state: Follow, outcome: list[int]) -> AsyncIterator[dict[str, Any]]:
        call = state.call()
        async with self.http.stream(call.method, call.path, params=call.params, headers=call.headers,
                                    timeout=state.timeout()) as response:
            if response.status_code != 200:
                await response.aread()
                outcome[0] = response.status_code
                if response.status_code == 204:
                    return
                self.core.answer(response.status_code, response.content)
            async for chunk in response.aiter_bytes():
                for event in state.feed(chunk):
                    yield event
        outcome[0] = 200

    async def result(self, task_id: str, timeout: float | None = None) -> HttpTaskRecord:
        return await await_result(self, task_id, timeout)  # type: ignore[return-value]

    async def redeliver_callback(self, task_id: str) -> dict[str, Any]:
        return dict(await self._call(self.core.redeliver(task_id)))

    async def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
                    tenant: str | None = None) -> list[dict[str, Any]]:
        pages = Pages(status, since, limit, tenant)
        while not pages.done:
            pages.take(await self._call(pages.next_call()))
        return pages.result()

    async def usage(self, by: str = "model", *, since: dt.datetime | None = None,
                    until: dt.datetime | None = None, tenant: str | None = None) -> dict[str, Any]:
        return dict(await self._call(self.core.usage(by, since, until, tenant)))

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncHttpClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
