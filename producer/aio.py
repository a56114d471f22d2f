"""The client for asyncio backends: submit, follow, wait for, cancel and retry tasks without blocking.

    async with AsyncClient() as client:
        handle = await client.submit(images=["s3://bucket/photo.jpg"], prompt="What is wrong here?")
        async for event in handle.events():
            ...
        record = await handle.result(timeout=300)

Same semantics as the sync `producer.client.Client`, from the same code: submit, retry and cancel are
the service layer's (producer/service/), run in a worker thread (`asyncio.to_thread`; short calls); the
events are followed with contracts/bus/aio.py, whose subscription is the sync one's
(contracts/bus/subscription.py); the result wait is producer/results.py's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import redis.asyncio as aioredis

from contracts.bus.aio import AsyncEventBus, LiveSource
from contracts.redis_clients import async_client
from contracts.settings import Settings, get_settings
from contracts.store import Store, TaskRecord
from producer.client import Client, as_ref
from producer.protocol import AsyncTaskHandle
from producer.results import await_result


class AsyncClient:
    def __init__(self, settings: Settings | None = None, *, store: Store | None = None,
                 redis_client: aioredis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = redis_client or async_client(
            self.settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
        self.bus = AsyncEventBus(self.redis, ttl_s=self.settings.event_ttl_s)
        self._owns_store = store is None
        self.store = store or Store.from_url(self.settings.database_url)
        self._sync: Client | None = None

    @property
    def sync(self) -> Client:
        """The sync client whose code submit, retry and cancel share (its Redis is never used here
        for events; its Celery app sends the task)."""
        if self._sync is None:
            self._sync = Client(self.settings, store=self.store)
        return self._sync

    # -- submit, retry, cancel -------------------------------------------------------------------
    async def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
                     **fields: Any) -> AsyncTaskHandle[AsyncClient]:
        """Validate and enqueue one job (fields as in the job request table), as `Client.submit`."""
        request = {"images": [as_ref(ref) for ref in images], "prompt": prompt, **fields}
        if model is not None:
            request["model"] = model
        return await self.submit_request(request)

    async def submit_request(self, request: dict[str, Any], *,
                             local_files: bool = True) -> AsyncTaskHandle[AsyncClient]:
        """As `Client.submit_request` (the same code, in a worker thread: one implementation)."""
        handle = await asyncio.to_thread(self.sync.submit_request, request, local_files=local_files)
        return AsyncTaskHandle(handle.task_id, handle.created, self)

    async def retry(self, task_id: str) -> int:
        """As `Client.retry`: a new run of a failed or cancelled task; returns the seq to follow it from."""
        return await asyncio.to_thread(self.sync.retry, task_id)

    async def cancel(self, task_id: str) -> bool:
        """As `Client.cancel`: stop a queued or running task; False when it had already finished."""
        return await asyncio.to_thread(self.sync.cancel, task_id)

    async def get(self, task_id: str) -> TaskRecord:
        """The task's row; NotFoundError (a KeyError) for an unknown task."""
        return await asyncio.to_thread(self.sync.get, task_id)

    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None, *, live: LiveSource | None = None,
               row: Any = None) -> AsyncGenerator[dict[str, Any], None]:
        """Every event of the task after from_seq, replayed then live, ending after the terminal event
        of its latest run (made from the row, `from_row: true`, when it never reached Redis).

        WaitTimeout (a TimeoutError) after `timeout` seconds in all, or `idle_timeout` without an event.
        `live`: where live messages come from (the API's fan-out hub); `row`: an async row reader
        (default: this client's store, in a thread).
        """
        return self.bus.subscribe(task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout,
                                  row=row or self.row, live=live)

    async def row(self, task_id: str) -> TaskRecord | None:
        """The task's row, or None (read in a worker thread)."""
        return await asyncio.to_thread(self.store.get, task_id)

    async def result(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Wait until the task is terminal (or WaitTimeout) and return the persisted record."""
        return await await_result(self, task_id, timeout)

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self._sync is not None:
            await asyncio.to_thread(self._sync.redis.close)
        if self._owns_store:
            await asyncio.to_thread(self.store.dispose)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
