"""Group-committed event publishing on the worker's event loop, for a process with thousands of streams.

Every event of the process goes through one queue on the loop (worker/loop.py): the first event queued
opens a window of WINDOW_S, then everything queued goes out in one pipeline (the publish Lua script,
EVALSHA per event, over redis.asyncio), and whatever was queued while a pipeline was in flight goes out
as the next one. Each wake-up of the loop costs tens of µs of CPU on a virtual machine (bench/RESULTS.md),
so the window trades at most WINDOW_S of delay for one send and one reply per window instead of one
per event. One queue keeps a run's events in the order it made them,
whichever thread made them.

- `publish_soon` (on the loop; the stream's deltas): queue the event, get a future of its seq.
- `publish` (any other thread; started, images_ready, the terminal event...): queue it and wait for its seq,
  so those callers' ordering is unchanged.

Each event also updates the task metrics (worker/ops/metrics.py) as it is queued.
"""

from __future__ import annotations

import asyncio
from typing import Any

import redis
import redis.asyncio as aioredis

from contracts.bus.publish import PUBLISH_LUA, publish_args
from contracts.bus.sync import EventBus
from contracts.logging import get_logger
from worker.loop import WorkerLoop
from worker.ops.metrics import EVENT_METRICS, EventMetrics

log = get_logger(__name__)

MAX_BATCH = 512
WINDOW_S = 0.002
_Item = tuple[tuple[Any, ...], "asyncio.Future[int]", str, str]  # (script args, seq future, type, task id)


class LoopEventBus(EventBus):
    """An EventBus whose publishes are group-committed on the worker's loop."""

    def __init__(self, client: redis.Redis, aclient: aioredis.Redis, loop: WorkerLoop, *, ttl_s: int = 86_400,
                 max_batch: int = MAX_BATCH, metrics: EventMetrics = EVENT_METRICS) -> None:
        super().__init__(client, ttl_s=ttl_s)
        self.aredis = aclient
        self.worker_loop = loop
        self.max_batch = max_batch
        self.metrics = metrics
        self._queue: list[_Item] = []
        self._sending = False
        self._sha: str | None = None
        self.batches = 0
        self.events = 0

    def publish(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0, **fields: Any) -> int:
        """Publish from a thread other than the loop's and return the event's seq."""
        return self.worker_loop.run(self._queued(task_id, type_, attempt, seq_floor, fields))

    async def _queued(self, task_id: str, type_: str, attempt: int, seq_floor: int, fields: dict[str, Any]) -> int:
        return await self.publish_soon(task_id, type_, attempt, seq_floor=seq_floor, **fields)

    def publish_soon(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0,
                     **fields: Any) -> asyncio.Future[int]:
        """Queue an event (on the loop); the future holds its seq once it is in Redis, or the error."""
        script_keys, event = publish_args(task_id, type_, attempt, fields)
        self._observe(task_id, type_, fields)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()
        self._queue.append(((*script_keys, event, self.ttl_s, int(seq_floor)), future, type_, task_id))
        if not self._sending:
            self._sending = True
            loop.call_later(WINDOW_S, self._start_sending, loop)
        return future

    def _start_sending(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.create_task(self._send_all())

    def _observe(self, task_id: str, type_: str, fields: dict[str, Any]) -> None:
        try:
            self.metrics.observe(task_id, type_, fields)
        except Exception:  # metrics never stand in the way of an event
            log.warning("metrics.observe_failed", type=type_, exc_info=True)

    async def _send_all(self) -> None:
        try:
            while self._queue:
                batch = self._queue[:self.max_batch]
                del self._queue[:self.max_batch]
                await self._send(batch)
        finally:
            self._sending = False

    async def _send(self, batch: list[_Item]) -> None:
        # The skip (a hole in seq after a lost event) is decided as the event leaves, in queue order.
        batch = [((*args, self.lost.take(task_id)), future, type_, task_id) for args, future, type_, task_id in batch]
        try:
            results = await self._execute(batch)
        except Exception as exc:  # every waiter gets the error; the queue goes on
            results = [exc] * len(batch)
        self.batches += 1
        self.events += len(batch)
        for (_, future, type_, task_id), result in zip(batch, results, strict=True):
            if isinstance(result, BaseException):
                self.lost.note(task_id)  # its followers will see a hole where this event was
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
                future.exception()  # retrieved: whoever queued it handles it; asyncio need not log it
            else:
                future.set_result(int(result))
                self.metrics.published(type_)

    async def _execute(self, batch: list[_Item]) -> list[Any]:
        if self._sha is None:
            self._sha = await self.aredis.script_load(PUBLISH_LUA)
        results = await self._pipeline(batch)
        missing = [i for i, r in enumerate(results) if isinstance(r, redis.exceptions.NoScriptError)]
        if missing:  # Redis lost its script cache (restart, SCRIPT FLUSH): load it, resend those events
            self._sha = await self.aredis.script_load(PUBLISH_LUA)
            for i, result in zip(missing, await self._pipeline([batch[i] for i in missing]), strict=True):
                results[i] = result
        return results

    async def _pipeline(self, batch: list[_Item]) -> list[Any]:
        pipe = self.aredis.pipeline(transaction=False)
        for args, _, _, _ in batch:
            pipe.execute_command("EVALSHA", self._sha, 3, *args)
        return list(await pipe.execute(raise_on_error=False))
