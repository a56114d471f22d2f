"""Events on Redis: the publisher (seq, pub/sub and the replay log in one atomic round trip) and the
subscriber (log first, then live, deduplicated by seq) that every viewer uses.

The subscriber's bookkeeping (which seq comes next, where the log was last read, when to give up)
lives in `SubscriptionState`, free of I/O, so this synchronous subscriber and the asyncio one in
`contracts/async_bus.py` share it and behave identically.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import redis

from contracts import events as ev

# KEYS: seq counter, replay log, channel. ARGV: the event JSON without its opening "{", TTL seconds.
# The seq is spliced in as the first field so an event is built once, in Python, and never re-encoded.
PUBLISH_LUA = """
local seq = redis.call('INCR', KEYS[1])
local event = '{"seq":' .. seq .. ',' .. ARGV[1]
redis.call('XADD', KEYS[2], '*', 'event', event)
redis.call('PUBLISH', KEYS[3], event)
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return seq
"""
_PUBLISH_LUA = PUBLISH_LUA  # the name it had first

READ_BATCH = 500
MAX_RECONNECTS = 5  # consecutive failed (re)connections before a subscriber gives up and raises
RECONNECTABLE = (redis.ConnectionError, redis.TimeoutError)
POLL_S = 1.0  # a quiet channel is checked against the log this often (a reconnect can drop messages)
CONFIRM_S = 5.0  # how long to wait for the server to confirm the subscription before reading the log


def publish_args(task_id: str, type_: str, attempt: int, fields: dict[str, Any]) -> tuple[list[str], str]:
    """The script's keys and its event argument for one event (shared by the sync and async buses)."""
    body = {"task_id": task_id, "type": type_, "ts": time.time(), "attempt": attempt, **fields}
    encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
    return [ev.seq_key(task_id), ev.log_key(task_id), ev.channel(task_id)], encoded[1:]


def decode_entry(fields: Any) -> dict[str, Any]:
    """The event held by one stream entry (bytes or str keys, whatever the client decodes)."""
    return json.loads(fields[b"event"] if b"event" in fields else fields["event"])


class EventBus:
    """Publishes and reads one task's events. Thread-safe: redis-py pools its connections."""

    def __init__(self, client: redis.Redis, *, ttl_s: int = 86_400) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._publish = client.register_script(PUBLISH_LUA)

    def publish(self, task_id: str, type_: str, attempt: int, **fields: Any) -> int:
        """Append one event to the log and the channel; returns its seq."""
        keys, event = publish_args(task_id, type_, attempt, fields)
        return int(self._publish(keys=keys, args=[event, self.ttl_s]))

    def read_log(self, task_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every logged event with seq > after_seq, in order."""
        out: list[dict[str, Any]] = []
        start = "-"
        while True:
            rows = self.redis.xrange(ev.log_key(task_id), min=start, count=READ_BATCH) or []
            out.extend(event for event in map(decode_entry, (f for _id, f in rows)) if event["seq"] > after_seq)
            if len(rows) < READ_BATCH:
                return out
            start = "(" + _as_str(rows[-1][0])

    def last_seq(self, task_id: str) -> int:
        value = self.redis.get(ev.seq_key(task_id))
        return int(value) if value else 0

    def subscribe(
        self, task_id: str, *, from_seq: int = 0, timeout: float | None = None, idle_timeout: float | None = None
    ) -> Iterator[dict[str, Any]]:
        """Yield every event with seq > from_seq exactly once, in seq order, ending after the terminal one.

        Subscribes to the channel (and waits for the server to confirm it) before reading the log, so
        nothing published in between is missed; a gap in the live seq (a message dropped on a
        reconnect) is filled from the log, which is also re-read whenever the channel is quiet.
        Raises TimeoutError when `timeout` (total) or `idle_timeout` (no event) passes first.
        """
        return _Subscription(self, SubscriptionState(task_id, from_seq, timeout, idle_timeout)).events()


class SubscriptionState:
    """One subscription's bookkeeping, without I/O: the next seq, the log cursor, the deadlines.

    The log is the source of truth: an event read from it is delivered whenever its seq is beyond the
    last one delivered (a hole in the log, say a trimmed entry, can never be filled, so it is not
    waited for); a live event is delivered only when it is exactly the next seq, otherwise the caller
    reads the log from the cursor, which never goes backwards, so each entry is read about once.
    """

    def __init__(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
                 idle_timeout: float | None = None) -> None:
        self.task_id = task_id
        self.last_seq = from_seq
        self.log_cursor: str | None = None  # id of the last log entry read
        self.done = False  # the terminal event was handed out
        now = time.monotonic()
        self.deadline = None if timeout is None else now + timeout
        self.idle_timeout = idle_timeout
        self.idle_since = now
        self.reconnects = 0

    # -- reading -------------------------------------------------------------------------------
    def log_start(self) -> str:
        """The XRANGE `min` for the next log read."""
        return "-" if self.log_cursor is None else "(" + self.log_cursor

    def take_log(self, rows: Sequence[tuple[Any, Any]]) -> list[dict[str, Any]]:
        """The events of one XRANGE batch that are due, in order; advances the cursor."""
        out: list[dict[str, Any]] = []
        for entry_id, fields in rows:
            self.log_cursor = _as_str(entry_id)
            event = decode_entry(fields)
            if self._due(event):
                out.append(event)
        return out

    def take_live(self, data: bytes | str) -> list[dict[str, Any]] | None:
        """[event] when a pub/sub message is the next seq, [] for an old one, None for a gap (read the log)."""
        if self.done:
            return []
        event = json.loads(data)
        if event["seq"] <= self.last_seq:
            return []
        if event["seq"] != self.last_seq + 1:
            return None
        self._due(event)
        return [event]

    def _due(self, event: dict[str, Any]) -> bool:
        if self.done or event["seq"] <= self.last_seq:
            return False
        self.last_seq = event["seq"]
        self.done = ev.is_terminal(event)
        return True

    # -- time ----------------------------------------------------------------------------------
    def delivered(self) -> None:
        """The consumer took an event: the idle clock starts again."""
        self.idle_since = time.monotonic()

    def wait_s(self) -> float:
        """How long to wait for the next live message before re-reading the log or giving up."""
        now = time.monotonic()
        waits = [POLL_S]
        if self.deadline is not None:
            waits.append(self.deadline - now)
        if self.idle_timeout is not None:
            waits.append(self.idle_since + self.idle_timeout - now)
        return max(0.0, min(waits))

    def reconnect_delay_s(self, error: Exception) -> float:
        """After a lost connection: how long to back off before subscribing again (the state is kept,
        so nothing is missed or repeated); raises `error` after MAX_RECONNECTS failures in a row."""
        self.reconnects += 1
        if self.reconnects > MAX_RECONNECTS:
            raise error
        self.check_timeouts()
        return min(2.0, 0.1 * 2 ** (self.reconnects - 1))

    def check_timeouts(self) -> None:
        now = time.monotonic()
        if self.deadline is not None and now >= self.deadline:
            raise TimeoutError(f"task {self.task_id}: no terminal event within the timeout")
        if self.idle_timeout is not None and now - self.idle_since >= self.idle_timeout:
            raise TimeoutError(f"task {self.task_id}: no event for {self.idle_timeout:g} s")


class _Subscription:
    def __init__(self, bus: EventBus, state: SubscriptionState) -> None:
        self.bus = bus
        self.state = state

    def events(self) -> Iterator[dict[str, Any]]:
        state = self.state
        while True:
            pubsub = self.bus.redis.pubsub()
            try:
                self._subscribe(pubsub)
                batch = self._catch_up()
                while True:
                    for event in batch:
                        yield event
                        if ev.is_terminal(event):
                            return
                        state.delivered()
                    # Checked on every turn, so a busy stream (or a slow consumer) cannot hold it off.
                    state.check_timeouts()
                    batch = self._next_batch(pubsub)
                    state.reconnects = 0
            except RECONNECTABLE as error:  # Redis restarted, failed over, or dropped us: resubscribe
                time.sleep(state.reconnect_delay_s(error))
            finally:
                pubsub.close()

    def _subscribe(self, pubsub: redis.client.PubSub) -> None:
        pubsub.subscribe(ev.channel(self.state.task_id))
        # SUBSCRIBE and XRANGE go over different connections: wait for the confirmation, or an event
        # published in between could be in neither (it would come from the next log read, late).
        give_up = time.monotonic() + CONFIRM_S
        while (remaining := give_up - time.monotonic()) > 0:
            message = pubsub.get_message(timeout=remaining)
            if message is not None and message["type"] == "subscribe":
                return

    def _catch_up(self) -> list[dict[str, Any]]:
        state, out = self.state, []
        while True:
            rows = self.bus.redis.xrange(ev.log_key(state.task_id), min=state.log_start(), count=READ_BATCH) or []
            out.extend(state.take_log(rows))
            if len(rows) < READ_BATCH:
                return out

    def _next_batch(self, pubsub: redis.client.PubSub) -> list[dict[str, Any]]:
        message = pubsub.get_message(timeout=self.state.wait_s())
        if message is None:  # a quiet channel may hide a missed message: the log is the source of truth
            return self._catch_up()
        if message["type"] != "message":
            return []
        batch = self.state.take_live(message["data"])
        return self._catch_up() if batch is None else batch


def _as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else value
