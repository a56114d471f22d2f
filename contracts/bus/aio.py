"""The event bus for asyncio programs (the HTTP API's SSE, async backends): same events, same semantics.

    bus = AsyncEventBus(contracts.redis_clients.async_client(url))  # one server or behind Sentinel
    async for event in bus.subscribe(task_id, from_seq=0, timeout=300):
        ...

Everything but the I/O is shared with contracts/bus/sync.py: the publish script, the event encoding,
the log reading (`LogRead`) and every decision of a subscription (`SubscriptionState`), so both
subscribers deliver exactly the same events and end the same way. The live messages come from a
`LiveSource`: by default a pub/sub connection of the subscriber's own; the API passes its fan-out
hub's (one connection per process, producer/api/fanout.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, Protocol

import redis.asyncio as aioredis

from contracts import keys
from contracts.bus.publish import (
    CONFIRM_S,
    PUBLISH_LUA,
    RECONNECTABLE,
    is_subscribe_confirmation,
    publish_args,
)
from contracts.bus.subscription import (
    END,
    HEARTBEAT,
    READ_BATCH,
    READ_ROW,
    SUBSCRIBE,
    Deliver,
    LogRead,
    ReadLog,
    Sleep,
    SubscriptionState,
    decode_entry,
)

AsyncRowReader = Callable[[str], Awaitable[Any]]  # task id -> its row, or None


class LiveSource(Protocol):
    """Where a subscriber's live messages come from (redis-py's message dicts)."""

    async def subscribe(self, channel: str) -> None:
        """Subscribed and confirmed; raises a RECONNECTABLE error when Redis cannot be reached."""

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        """The next message, or None after `timeout`; RECONNECTABLE when the connection was lost."""

    async def aclose(self) -> None: ...


class PubSubLive:
    """A pub/sub connection of the subscriber's own."""

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._pubsub: Any = None

    async def subscribe(self, channel: str) -> None:
        await self.aclose()
        self._pubsub = self._client.pubsub()
        await self._pubsub.subscribe(channel)
        give_up = time.monotonic() + CONFIRM_S
        while (remaining := give_up - time.monotonic()) > 0:
            if is_subscribe_confirmation(await self._pubsub.get_message(timeout=remaining)):
                return

    async def get_message(self, timeout: float) -> dict[str, Any] | None:
        message: dict[str, Any] | None = await self._pubsub.get_message(timeout=timeout)
        return message

    async def aclose(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            await pubsub.aclose()


class AsyncEventBus:
    """Publishes and reads tasks' events with redis.asyncio; safe to share within one event loop."""

    def __init__(self, client: aioredis.Redis, *, ttl_s: int = 86_400) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._publish = client.register_script(PUBLISH_LUA)

    async def publish(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0, **fields: Any) -> int:
        """Append one event to the log and the channel; returns its seq (above `seq_floor`, always)."""
        script_keys, event = publish_args(task_id, type_, attempt, fields)
        return int(await self._publish(keys=script_keys, args=[event, self.ttl_s, int(seq_floor)]))

    async def read_log(self, task_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every logged event with seq > after_seq, in log order."""
        read = LogRead(after_seq)
        while not read.take(await self.redis.xrange(keys.log_key(task_id), min=read.start(), count=READ_BATCH) or []):
            pass
        return read.events

    async def last_seq(self, task_id: str) -> int:
        value = await self.redis.get(keys.seq_key(task_id))
        return int(value) if value else 0

    async def last_event(self, task_id: str) -> dict[str, Any] | None:
        """The newest logged event (None when the log is empty or expired)."""
        rows = await self.redis.xrevrange(keys.log_key(task_id), count=1)
        return decode_entry(rows[0][1]) if rows else None

    def subscribe(
        self, task_id: str, from_seq: int = 0, timeout: float | None = None, *,
        idle_timeout: float | None = None, row: AsyncRowReader | None = None,
        live: LiveSource | None = None,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Yield every event with seq > from_seq exactly once, in seq order, ending after the terminal
        event of the task's latest run.

        As `EventBus.subscribe` (same rules, same `row`). `live`: where live messages come from
        (default: a pub/sub connection of its own). Close it early with `contextlib.aclosing` (or by
        cancelling the task).
        """
        state = SubscriptionState(task_id, from_seq, timeout, idle_timeout, checks_row=row is not None)
        return _drive(self.redis, state, row, live or PubSubLive(self.redis))  # type: ignore[return-value]

    def heartbeats(
        self, task_id: str, from_seq: int = 0, *, heartbeat_s: float, row: AsyncRowReader | None = None,
        live: LiveSource | None = None,
    ) -> AsyncGenerator[dict[str, Any] | None, None]:
        """As `subscribe`, and None after each `heartbeat_s` without an event (for keep-alives:
        cheaper than a timed wait per event around `subscribe`)."""
        state = SubscriptionState(task_id, from_seq, checks_row=row is not None, heartbeat_s=heartbeat_s)
        return _drive(self.redis, state, row, live or PubSubLive(self.redis))


async def _drive(client: aioredis.Redis, state: SubscriptionState, row: AsyncRowReader | None,
                 live: LiveSource) -> AsyncGenerator[dict[str, Any] | None, None]:
    """Perform the state's actions with redis.asyncio; the only code here is I/O."""
    try:
        while True:
            action = state.next()
            if isinstance(action, Deliver):
                yield action.event
                state.delivered()
            elif action is HEARTBEAT:
                yield None
            elif action is END:
                return
            elif isinstance(action, Sleep):
                await asyncio.sleep(action.seconds)
            elif action is READ_ROW:
                state.take_row(await _read_row(row, state.task_id))
            else:
                try:
                    if action is SUBSCRIBE:
                        await live.subscribe(keys.channel(state.task_id))
                        state.subscribed()
                    elif isinstance(action, ReadLog):
                        state.take_log(await client.xrange(keys.log_key(state.task_id), min=action.start,
                                                           count=READ_BATCH) or [])
                    else:
                        state.take_message(await live.get_message(action.timeout))  # type: ignore[union-attr]
                except RECONNECTABLE as error:  # Redis restarted, failed over, or dropped us: resubscribe
                    state.connection_lost(error)
    finally:
        await live.aclose()


async def _read_row(row: AsyncRowReader | None, task_id: str) -> Any:
    if row is None:
        return None
    try:
        return await row(task_id)
    except Exception:  # the database is unreachable: the row is read again later
        return None
