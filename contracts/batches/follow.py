"""Following a batch: its log read with XREAD BLOCK, which replays what is logged and then waits for what
comes, in one call; I/O-free here, driven by redis-py (`follow`, the CLI and the direct client) and by
redis.asyncio (`afollow`, the API's SSE). Ends after the batch.completed of the round it started in (or a
later one); a caller that hears nothing for a while asks the row (`idle`), since the log expires.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import redis
import redis.asyncio as aioredis

from contracts import events as ev
from contracts import keys
from contracts.bus.subscription import as_str, decode_entry

BLOCK_S = 5.0  # one XREAD's wait; `idle` is asked after each silent one


class BatchFollow:
    """The follower's state: where it is in the log, and whether the end came."""

    def __init__(self, batch_id: str, *, from_seq: int = 0, round_: int = 0) -> None:
        self.log = keys.batch_stream_keys(batch_id)[1]
        self.cursor = "0-0"
        self.after_seq = from_seq
        self.round = round_
        self.done = False

    def request(self) -> dict[Any, Any]:
        return {self.log: self.cursor}

    def take(self, reply: Any) -> list[dict[str, Any]]:
        """The events of one XREAD reply that are new, in order; `done` once the end is among them."""
        out: list[dict[str, Any]] = []
        for _stream, entries in reply or ():
            for entry_id, fields in entries:
                self.cursor = as_str(entry_id)
                event = decode_entry(fields)
                if int(event.get("seq", 0)) <= self.after_seq or self.done:
                    continue
                self.after_seq = int(event["seq"])
                out.append(event)
                if event.get("type") == ev.BATCH_COMPLETED and int(event.get("round", 0)) >= self.round:
                    self.done = True
        return out


def follow(client: redis.Redis, state: BatchFollow, idle: Callable[[], bool],
           block_s: float = BLOCK_S) -> Iterator[dict[str, Any]]:
    """Yield the batch's events until its end; `idle()` after a silent wait: True ends the follow."""
    while not state.done:
        events = state.take(client.xread(state.request(), block=int(block_s * 1000), count=500))
        yield from events
        if not events and idle():
            return


async def afollow(client: aioredis.Redis, state: BatchFollow, idle: Callable[[], Any],
                  block_s: float = BLOCK_S) -> AsyncIterator[dict[str, Any] | None]:
    """As `follow`, on asyncio; yields None after each silent wait (an SSE keep-alive's moment)."""
    while not state.done:
        events = state.take(await client.xread(state.request(), block=int(block_s * 1000), count=500))
        for event in events:
            yield event
        if not events:
            if await idle():
                return
            yield None
