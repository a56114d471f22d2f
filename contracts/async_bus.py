"""The event bus for asyncio programs (the HTTP API's SSE, async backends): same events, same semantics.

    bus = AsyncEventBus(redis.asyncio.Redis.from_url(url))
    async for event in bus.subscribe(task_id, from_seq=0, timeout=300):
        ...

Everything but the I/O is `contracts.bus`'s: the publish script, the event encoding and the
subscription bookkeeping (`SubscriptionState`), so both subscribers deliver exactly the same events.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from typing import Any

import redis.asyncio as aioredis

from contracts import events as ev
from contracts.bus import (
    CONFIRM_S,
    PUBLISH_LUA,
    READ_BATCH,
    RECONNECTABLE,
    SubscriptionState,
    decode_entry,
    publish_args,
)


class AsyncEventBus:
    """Publishes and reads tasks' events with redis.asyncio; safe to share within one event loop."""

    def __init__(self, client: aioredis.Redis, *, ttl_s: int = 86_400) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._publish = client.register_script(PUBLISH_LUA)

    async def publish(self, task_id: str, type_: str, attempt: int, **fields: Any) -> int:
        """Append one event to the log and the channel; returns its seq."""
        keys, event = publish_args(task_id, type_, attempt, fields)
        return int(await self._publish(keys=keys, args=[event, self.ttl_s]))

    async def read_log(self, task_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every logged event with seq > after_seq, in order."""
        return await self._catch_up(SubscriptionState(task_id, after_seq))

    async def last_seq(self, task_id: str) -> int:
        value = await self.redis.get(ev.seq_key(task_id))
        return int(value) if value else 0

    async def last_event(self, task_id: str) -> dict[str, Any] | None:
        """The newest logged event (None when the log is empty or expired)."""
        rows = await self.redis.xrevrange(ev.log_key(task_id), count=1)
        return decode_entry(rows[0][1]) if rows else None

    async def subscribe(
        self, task_id: str, from_seq: int = 0, timeout: float | None = None, *,
        idle_timeout: float | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield every event with seq > from_seq exactly once, in seq order, ending after the terminal one.

        As `EventBus.subscribe`: subscribe (confirmed), read the log, then live; gaps and quiet
        periods are filled from the log. Raises TimeoutError when `timeout` (total) or `idle_timeout`
        (no event) passes first. Close it early with `contextlib.aclosing` (or by cancelling the task).
        """
        state = SubscriptionState(task_id, from_seq, timeout, idle_timeout)
        while True:
            pubsub = self.redis.pubsub()
            try:
                await self._subscribe(pubsub, task_id)
                batch = await self._catch_up(state)
                while True:
                    for event in batch:
                        yield event
                        if ev.is_terminal(event):
                            return
                        state.delivered()
                    state.check_timeouts()
                    batch = await self._next_batch(pubsub, state)
                    state.reconnects = 0
            except RECONNECTABLE as error:  # Redis restarted, failed over, or dropped us: resubscribe
                await asyncio.sleep(state.reconnect_delay_s(error))
            finally:
                await pubsub.aclose()

    async def _subscribe(self, pubsub: Any, task_id: str) -> None:
        await pubsub.subscribe(ev.channel(task_id))
        give_up = time.monotonic() + CONFIRM_S
        while (remaining := give_up - time.monotonic()) > 0:
            message = await pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "subscribe":
                return

    async def _catch_up(self, state: SubscriptionState) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        while True:
            rows = await self.redis.xrange(ev.log_key(state.task_id), min=state.log_start(), count=READ_BATCH) or []
            out.extend(state.take_log(rows))
            if len(rows) < READ_BATCH:
                return out

    async def _next_batch(self, pubsub: Any, state: SubscriptionState) -> list[dict[str, Any]]:
        message = await pubsub.get_message(timeout=state.wait_s())
        if message is None:
            return await self._catch_up(state)
        if message["type"] != "message":
            return []
        batch = state.take_live(message["data"])
        return await self._catch_up(state) if batch is None else batch
