"""Events on Redis: the publisher (seq, pub/sub and the replay log in one atomic round trip) and the
synchronous subscriber (log first, then live, deduplicated by seq) that every sync viewer uses.

What a subscriber reads next and delivers is decided by `contracts.subscription.SubscriptionState`,
free of I/O; this module only drives it with redis-py (and a row reader), as `contracts.async_bus`
drives the same object with redis.asyncio, so both behave identically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from contracts import events as ev
from contracts.subscription import (
    END,
    MAX_RECONNECTS,
    POLL_S,
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

__all__ = ["CONFIRM_S", "MAX_RECONNECTS", "POLL_S", "PUBLISH_LUA", "READ_BATCH", "RECONNECTABLE", "EventBus",
           "SubscriptionState", "decode_entry", "publish_args"]

# KEYS: seq counter, replay log, channel. ARGV: the event JSON without its opening "{", TTL seconds,
# the seq floor. The seq is spliced in as the first field so an event is built once, in Python, and
# never re-encoded. The floor (the highest seq the caller knows of) keeps seq from going back when
# Redis lost the counter (restarted without persistence).
PUBLISH_LUA = """
local seq = redis.call('INCR', KEYS[1])
local floor = tonumber(ARGV[3] or '0') or 0
if seq <= floor then
  seq = floor + 1
  redis.call('SET', KEYS[1], seq)
end
local event = '{"seq":' .. seq .. ',' .. ARGV[1]
redis.call('XADD', KEYS[2], '*', 'event', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return seq
"""
_PUBLISH_LUA = PUBLISH_LUA  # the name it had first

RECONNECTABLE = (redis.ConnectionError, redis.TimeoutError)
CONFIRM_S = 5.0  # how long to wait for the server to confirm the subscription before reading the log

RowReader = Callable[[str], Any]  # task id -> its row (contracts.store.TaskRecord) or None


def publish_args(task_id: str, type_: str, attempt: int, fields: dict[str, Any]) -> tuple[list[str], str]:
    """The script's keys and its event argument for one event (shared by the sync and async buses)."""
    body = {"task_id": task_id, "type": type_, "ts": time.time(), "attempt": attempt, **fields}
    encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return [ev.seq_key(task_id), ev.log_key(task_id), ev.channel(task_id)], encoded[1:]


class EventBus:
    """Publishes and reads one task's events. Thread-safe: redis-py pools its connections."""

    def __init__(self, client: redis.Redis, *, ttl_s: int = 86_400) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._publish = client.register_script(PUBLISH_LUA)

    def publish(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0, **fields: Any) -> int:
        """Append one event to the log and the channel; returns its seq (above `seq_floor`, always)."""
        keys, event = publish_args(task_id, type_, attempt, fields)
        return int(self._publish(keys=keys, args=[event, self.ttl_s, int(seq_floor)]))

    def read_log(self, task_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every logged event with seq > after_seq, in log order."""
        read = LogRead(after_seq)
        while not read.take(self.redis.xrange(ev.log_key(task_id), min=read.start(), count=READ_BATCH) or []):
            pass
        return read.events

    def last_seq(self, task_id: str) -> int:
        value = self.redis.get(ev.seq_key(task_id))
        return int(value) if value else 0

    def subscribe(
        self, task_id: str, *, from_seq: int = 0, timeout: float | None = None, idle_timeout: float | None = None,
        row: RowReader | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield every event with seq > from_seq exactly once, in seq order, ending after the terminal
        event of the task's latest run (contracts.subscription has the rules).

        Subscribes to the channel (and waits for the server to confirm it) before reading the log, so
        nothing published in between is missed; a gap in the live seq (a message dropped on a
        reconnect) is filled from the log, which is also re-read whenever the channel is quiet.
        `row(task_id)` reads the task's row: with it, a terminal row ends the subscription even when
        its event never reached the log, and a lost Redis is waited for. Raises TimeoutError when
        `timeout` (total) or `idle_timeout` (no event) passes first.
        """
        state = SubscriptionState(task_id, from_seq, timeout, idle_timeout, checks_row=row is not None)
        return _drive(self.redis, state, row)


def _drive(client: redis.Redis, state: SubscriptionState, row: RowReader | None) -> Iterator[dict[str, Any]]:
    """Perform the state's actions with redis-py; the only code here is I/O."""
    pubsub: redis.client.PubSub | None = None
    try:
        while True:
            action = state.next()
            if isinstance(action, Deliver):
                yield action.event
                state.delivered()
            elif action is END:
                return
            elif isinstance(action, Sleep):
                time.sleep(action.seconds)
            elif action is READ_ROW:
                state.take_row(_read_row(row, state.task_id))
            else:
                try:
                    if action is SUBSCRIBE:
                        if pubsub is not None:
                            pubsub.close()
                        pubsub = client.pubsub()
                        _subscribe(pubsub, ev.channel(state.task_id))
                        state.subscribed()
                    elif isinstance(action, ReadLog):
                        state.take_log(client.xrange(ev.log_key(state.task_id), min=action.start,
                                                     count=READ_BATCH) or [])
                    else:
                        assert pubsub is not None
                        state.take_message(pubsub.get_message(timeout=action.timeout))  # type: ignore[union-attr]
                except RECONNECTABLE as error:  # Redis restarted, failed over, or dropped us: resubscribe
                    state.connection_lost(error)
    finally:
        if pubsub is not None:
            pubsub.close()


def _subscribe(pubsub: redis.client.PubSub, channel: str) -> None:
    pubsub.subscribe(channel)
    # SUBSCRIBE and XRANGE go over different connections: wait for the confirmation, or an event
    # published in between could be in neither (it would come from the next log read, late).
    give_up = time.monotonic() + CONFIRM_S
    while (remaining := give_up - time.monotonic()) > 0:
        message = pubsub.get_message(timeout=remaining)
        if message is not None and message["type"] == "subscribe":
            return


def _read_row(row: RowReader | None, task_id: str) -> Any:
    if row is None:
        return None
    try:
        return row(task_id)
    except Exception:  # the database is unreachable: the row is read again later
        return None
