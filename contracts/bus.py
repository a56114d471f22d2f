"""Events on Redis: the publisher (seq, pub/sub and the replay log in one atomic round trip) and the
subscriber (log first, then live, deduplicated by seq) that every viewer uses."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import redis

from contracts import events as ev

# KEYS: seq counter, replay log, channel. ARGV: the event JSON without its opening "{", TTL seconds.
# The seq is spliced in as the first field so an event is built once, in Python, and never re-encoded.
_PUBLISH_LUA = """
local seq = redis.call('INCR', KEYS[1])
local event = '{"seq":' .. seq .. ',' .. ARGV[1]
redis.call('XADD', KEYS[2], '*', 'event', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return seq
"""

_READ_BATCH = 500


class EventBus:
    """Publishes and reads one task's events. Thread-safe: redis-py pools its connections."""

    def __init__(self, client: redis.Redis, *, ttl_s: int = 86_400) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._publish = client.register_script(_PUBLISH_LUA)

    def publish(self, task_id: str, type_: str, attempt: int, **fields: Any) -> int:
        """Append one event to the log and the channel; returns its seq."""
        body = {"task_id": task_id, "type": type_, "ts": time.time(), "attempt": attempt, **fields}
        encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
        keys = [ev.seq_key(task_id), ev.log_key(task_id), ev.channel(task_id)]
        return int(self._publish(keys=keys, args=[encoded[1:], self.ttl_s]))

    def read_log(self, task_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every logged event with seq > after_seq, in order."""
        out: list[dict[str, Any]] = []
        start = "-"
        while True:
            rows = self.redis.xrange(ev.log_key(task_id), min=start, count=_READ_BATCH)
            for _entry_id, fields in rows:
                event = json.loads(fields[b"event"] if b"event" in fields else fields["event"])
                if event["seq"] > after_seq:
                    out.append(event)
            if len(rows) < _READ_BATCH:
                return out
            start = "(" + _as_str(rows[-1][0])

    def last_seq(self, task_id: str) -> int:
        value = self.redis.get(ev.seq_key(task_id))
        return int(value) if value else 0

    def subscribe(
        self, task_id: str, *, from_seq: int = 0, timeout: float | None = None, idle_timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield every event with seq > from_seq exactly once, in seq order, ending after the terminal one.

        Subscribes to the channel before reading the log, so nothing published in between is missed;
        a gap in the live seq (a message dropped on a reconnect) is filled from the log.
        Raises TimeoutError when `timeout` (total) or `idle_timeout` (no event) passes first.
        """
        return _Subscription(self, task_id, from_seq, timeout, idle_timeout).events()


class _Subscription:
    def __init__(
        self, bus: EventBus, task_id: str, from_seq: int, timeout: float | None, idle_timeout: float | None
    ) -> None:
        self.bus = bus
        self.task_id = task_id
        self.last_seq = from_seq
        self.deadline = None if timeout is None else time.monotonic() + timeout
        self.idle_timeout = idle_timeout

    def events(self) -> Iterator[dict[str, Any]]:
        pubsub = self.bus.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(ev.channel(self.task_id))
            for event in self._catch_up():
                yield event
                if ev.is_terminal(event):
                    return
            yield from self._live(pubsub)
        finally:
            pubsub.close()

    def _catch_up(self) -> Iterator[dict[str, Any]]:
        for event in self.bus.read_log(self.task_id, self.last_seq):
            if event["seq"] == self.last_seq + 1:
                self.last_seq = event["seq"]
                yield event

    def _live(self, pubsub: redis.client.PubSub) -> Iterator[dict[str, Any]]:
        idle_since = time.monotonic()
        while True:
            message = pubsub.get_message(timeout=self._wait_s(idle_since))
            if message is None:
                self._check_timeouts(idle_since)
                # A quiet channel may hide a missed message: the log is the source of truth.
                batch = list(self._catch_up())
            else:
                event = json.loads(message["data"])
                if event["seq"] <= self.last_seq:
                    continue
                if event["seq"] == self.last_seq + 1:
                    self.last_seq = event["seq"]
                    batch = [event]
                else:  # a gap: what we missed is in the log, and so is this event
                    batch = list(self._catch_up())
            for event in batch:
                idle_since = time.monotonic()
                yield event
                if ev.is_terminal(event):
                    return

    def _wait_s(self, idle_since: float) -> float:
        waits = [1.0]
        now = time.monotonic()
        if self.deadline is not None:
            waits.append(self.deadline - now)
        if self.idle_timeout is not None:
            waits.append(idle_since + self.idle_timeout - now)
        return max(0.0, min(waits))

    def _check_timeouts(self, idle_since: float) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise TimeoutError(f"task {self.task_id}: no terminal event within the timeout")
        if self.idle_timeout is not None and now - idle_since >= self.idle_timeout:
            raise TimeoutError(f"task {self.task_id}: no event for {self.idle_timeout:g} s")


def _as_str(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
