"""The client for asyncio backends: follow a task's events and wait for its result without a thread.

    async with AsyncClient() as client:
        async for event in client.events(task_id):
            ...
        record = await client.result(task_id, timeout=300)

Events come from `contracts.async_bus` (same semantics as the sync client: replay, then live, each
event once, ending after the terminal one). The task row is read through the synchronous store in a
worker thread (SQLAlchemy's sync engine; one short query), so the event loop never blocks on SQL.
Submitting and cancelling stay with the sync `producer.client.Client` (call it through
`asyncio.to_thread`), or use the HTTP API.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any

import redis.asyncio as aioredis

from contracts import events as ev
from contracts.async_bus import AsyncEventBus
from contracts.settings import Settings, get_settings
from contracts.store import Store, TaskRecord


class AsyncClient:
    def __init__(self, settings: Settings | None = None, *, store: Store | None = None,
                 redis_client: aioredis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = redis_client or aioredis.Redis.from_url(
            self.settings.redis_url, socket_connect_timeout=5, health_check_interval=30)
        self.bus = AsyncEventBus(self.redis, ttl_s=self.settings.event_ttl_s)
        self._owns_store = store is None
        self.store = store or Store.from_url(self.settings.database_url)

    async def get(self, task_id: str) -> TaskRecord:
        """The task's row; KeyError for an unknown task."""
        record = await asyncio.to_thread(self.store.get, task_id)
        if record is None:
            raise KeyError(f"no task {task_id!r}")
        return record

    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> AsyncGenerator[dict[str, Any], None]:
        """Every event of the task after from_seq, replayed then live, ending after the terminal one.

        TimeoutError after `timeout` seconds in all, or `idle_timeout` seconds without an event.
        """
        return self.bus.subscribe(task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout)

    async def result(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Wait until the task is terminal (or TimeoutError) and return the persisted record."""
        deadline = None if timeout is None else time.monotonic() + timeout
        record = await self.get(task_id)
        while not record.is_terminal:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                async with aclosing(self.events(task_id, timeout=remaining)) as events:
                    async for event in events:
                        if ev.is_terminal(event):
                            break
            except TimeoutError:
                raise TimeoutError(f"task {task_id} did not finish within {timeout:g} s") from None
            record = await self._wait_for_row(task_id, deadline)
            if not record.is_terminal and deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} did not finish within {timeout:g} s")
        return record

    async def _wait_for_row(self, task_id: str, deadline: float | None) -> TaskRecord:
        # The worker persists before it publishes the terminal event; a replica may lag a moment.
        while True:
            record = await self.get(task_id)
            if record.is_terminal or (deadline is not None and time.monotonic() > deadline):
                return record
            await asyncio.sleep(0.05)

    async def aclose(self) -> None:
        await self.redis.aclose()
        if self._owns_store:
            await asyncio.to_thread(self.store.dispose)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
