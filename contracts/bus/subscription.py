"""Following one task's events, without I/O: what to read next and what to deliver.

As h11 is HTTP without sockets, `SubscriptionState` is a subscription without Redis: its driver asks
`next()` for an action, performs it (the only I/O), and hands the result back. The synchronous
driver (`contracts/bus/sync.py`), the asyncio one (`contracts/bus/aio.py`) and the API's fan-out
(`producer/api/fanout.py`, through the asyncio driver) all run this one object, so every viewer ends
the same way:

    Subscribe      subscribe to the task's channel (confirmed)     -> subscribed()
    ReadLog(start) XRANGE the log from `start`, READ_BATCH rows    -> take_log(rows)
    WaitLive(s)    wait up to s seconds for a pub/sub message      -> take_message(message or None)
    ReadRow        read the task's row (database)                  -> take_row(record or None)
    Sleep(s)       back off after a lost connection
    Deliver(event) hand the event to the consumer                  -> delivered()
    HEARTBEAT      (only with heartbeat_s) heartbeat_s passed without an event: tell the consumer
    END            the subscription is over
    any Redis I/O that fails with a connection error               -> connection_lost(error)

The rules (README, Events):
- the log is the source of truth; a live message is taken only when it is exactly the next seq, else
  the log is read (gap fill); a quiet channel is checked against the log every POLL_S;
- a hole the log cannot fill (Redis lost those events, or the worker could not publish them) is
  delivered as `stream.gap {from_seq, to_seq}` before the event after it, so no viewer passes a hole off
  as the whole text; the terminal event (or the row) still carries the whole text;
- runs: a terminal event read from the log ends the subscription only when no later `task.queued`
  (a manual retry's new run) follows it in the log; a live terminal event is the newest by
  construction and ends it;
- the row is the truth: after ROW_CHECK_S without an event, the row is read; when it is terminal and
  no terminal event came (Redis was down when the task ended, or restarted and lost the log), the log
  is read once more and, ROW_GRACE_S later, the terminal event is made from the row (`from_row: true`,
  seq after every seq known), so no viewer waits forever on a finished task;
- with a row to read, a lost Redis is retried for as long as the timeouts allow; without one, the
  subscription gives up after MAX_RECONNECTS failed reconnections in a row.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from contracts import events as ev
from contracts import retry
from contracts.catalog import cost_as_text
from contracts.errors import ERROR_CODES, WaitTimeout

READ_BATCH = 500
MAX_RECONNECTS = 5  # consecutive failed (re)connections before a subscriber without a row gives up
POLL_S = 1.0  # a quiet channel is checked against the log this often (a reconnect can drop messages)
ROW_CHECK_S = 5.0  # the row is read after this long without an event
ROW_GRACE_S = 1.0  # a terminal row waits this long for its event before one is made from the row


# -- actions -------------------------------------------------------------------------------------
class _Named:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


SUBSCRIBE = _Named("Subscribe")
HEARTBEAT = _Named("Heartbeat")
READ_ROW = _Named("ReadRow")
END = _Named("End")


@dataclass(frozen=True)
class ReadLog:
    start: str


@dataclass(frozen=True)
class WaitLive:
    timeout: float


@dataclass(frozen=True)
class Sleep:
    seconds: float


@dataclass(frozen=True)
class Deliver:
    event: dict[str, Any]


Action = _Named | ReadLog | WaitLive | Sleep | Deliver


def decode_entry(fields: Any) -> dict[str, Any]:
    """The event held by one stream entry (bytes or str keys, whatever the client decodes)."""
    return json.loads(fields[b"event"] if b"event" in fields else fields["event"])  # type: ignore[no-any-return]


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class LogRead:
    """Reading a whole log (`read_log`): every event with seq > after_seq, in log order."""

    def __init__(self, after_seq: int = 0) -> None:
        self.after_seq = after_seq
        self.cursor: str | None = None
        self.events: list[dict[str, Any]] = []

    def start(self) -> str:
        return "-" if self.cursor is None else "(" + self.cursor

    def take(self, rows: Sequence[tuple[Any, Any]]) -> bool:
        """One XRANGE batch; True once the log is read to its end."""
        for entry_id, fields in rows:
            self.cursor = as_str(entry_id)
            event = decode_entry(fields)
            if event["seq"] > self.after_seq:
                self.events.append(event)
        return len(rows) < READ_BATCH


class SubscriptionState:
    """One subscription's decisions and bookkeeping (see the module docstring for the protocol)."""

    def __init__(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
                 idle_timeout: float | None = None, *, checks_row: bool = False,
                 heartbeat_s: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.task_id = task_id
        self.last_seq = from_seq  # the highest seq taken for delivery
        self.log_cursor: str | None = None  # id of the last log entry settled
        self.done = False  # the final event is taken: deliver what is pending, then end
        self.checks_row = checks_row
        self.reconnects = 0
        self._clock = clock
        now = clock()
        self.deadline = None if timeout is None else now + timeout
        self.idle_timeout = idle_timeout
        self.idle_since = now
        self._pending: deque[dict[str, Any]] = deque()
        self._subscribed = False
        self._catching_up = False
        self._batch: list[dict[str, Any]] = []
        self._batch_cursor: str | None = None
        self._resume_at = 0.0
        self._row_at = now + ROW_CHECK_S
        self._row_terminal_seen = False
        self.heartbeat_s = heartbeat_s
        self._beat_at = now + heartbeat_s if heartbeat_s else None

    # -- the protocol --------------------------------------------------------------------------
    def next(self) -> Action:
        """What the driver does next; raises TimeoutError when a timeout passed first."""
        if self._pending:
            return Deliver(self._pending.popleft())
        if self.done:
            return END
        self.check_timeouts()
        now = self._clock()
        if self._beat_at is not None and now >= self._beat_at:
            self._beat_at = now + (self.heartbeat_s or 0)
            return HEARTBEAT
        if self.checks_row and now >= self._row_at:
            return READ_ROW
        if now < self._resume_at:
            return Sleep(self._bounded(self._resume_at - now, now))
        if not self._subscribed:
            return SUBSCRIBE
        if self._catching_up:
            return ReadLog(self._log_start())
        return WaitLive(self.wait_s())

    def subscribed(self) -> None:
        """The channel is subscribed (confirmed): read the log, from the cursor, before going live."""
        self._subscribed = True
        self._catching_up = True

    def take_log(self, rows: Sequence[tuple[Any, Any]]) -> None:
        """One XRANGE batch of READ_BATCH at most; a shorter one ends the read."""
        self.reconnects = 0
        for entry_id, fields in rows:
            self._batch_cursor = as_str(entry_id)
            self._batch.append(decode_entry(fields))
        if len(rows) < READ_BATCH:
            self._settle_log()

    def take_message(self, message: dict[str, Any] | None) -> None:
        """What a wait for a live message gave: a pub/sub message, or None when the wait timed out."""
        self.reconnects = 0
        if message is None:  # a quiet channel may hide a missed message: the log is the source of truth
            self._catching_up = True
        elif message.get("type") == "message":
            self.take_live(message.get("event") or message["data"])

    def take_live(self, data: bytes | str | dict[str, Any]) -> None:
        """One live message's data (or its event, already decoded by a fan-out: never modified)."""
        if self.done:
            return
        event = data if isinstance(data, dict) else json.loads(data)
        if event["seq"] <= self.last_seq:
            return
        if event["seq"] != self.last_seq + 1:
            self._catching_up = True  # a gap: fill it from the log
            return
        self._take(event)
        self.done = ev.is_terminal(event)  # live, so the newest run's

    def take_row(self, record: Any) -> None:
        """The task's row (None when it could not be read); may make the terminal event from it."""
        now = self._clock()
        self._row_at = now + ROW_CHECK_S
        if record is None or self.done:
            return
        if record.status not in ev.EVENT_OF_STATUS:
            self._row_terminal_seen = False
            return
        if not self._row_terminal_seen:  # its event may be on its way: read the log, wait a moment
            self._row_terminal_seen = True
            self._row_at = now + ROW_GRACE_S
            self._catching_up = self._subscribed
            return
        known = int(getattr(record, "last_seq", 0) or 0)
        if known > self.last_seq:  # events up to `known` existed and never reached this follower
            self._pending.append(gap_event(self.task_id, self.last_seq + 1, known))
        event = event_from_row(record, max(self.last_seq, known) + 1)
        self._take(event)
        self.done = True

    def delivered(self) -> None:
        """The consumer took an event: the idle clock starts again."""
        self.idle_since = now = self._clock()
        if self._beat_at is not None:
            self._beat_at = now + (self.heartbeat_s or 0)
        if not self._row_terminal_seen:
            self._row_at = max(self._row_at, now + ROW_CHECK_S)

    def connection_lost(self, error: Exception) -> None:
        """Redis failed: back off, then subscribe again and read the log from the cursor (nothing is
        missed or repeated). Without a row to read, raises `error` after MAX_RECONNECTS in a row."""
        self.reconnects += 1
        self._subscribed = self._catching_up = False
        self._batch, self._batch_cursor = [], None
        if not self.checks_row and self.reconnects > MAX_RECONNECTS:
            raise error
        self.check_timeouts()
        self._resume_at = self._clock() + retry.SUBSCRIBE_RECONNECT.delay(self.reconnects)

    # -- time ----------------------------------------------------------------------------------
    def wait_s(self) -> float:
        """How long to wait for the next live message before re-reading the log or the row."""
        now = self._clock()
        return self._bounded(POLL_S, now)

    def _bounded(self, wait: float, now: float) -> float:
        waits = [wait]
        if self.deadline is not None:
            waits.append(self.deadline - now)
        if self.idle_timeout is not None:
            waits.append(self.idle_since + self.idle_timeout - now)
        if self.checks_row:
            waits.append(self._row_at - now)
        if self._beat_at is not None:
            waits.append(self._beat_at - now)
        return max(0.0, min(waits))

    def check_timeouts(self) -> None:
        now = self._clock()
        if self.deadline is not None and now >= self.deadline:
            raise WaitTimeout(f"task {self.task_id}: no terminal event within the timeout")
        if self.idle_timeout is not None and now - self.idle_since >= self.idle_timeout:
            raise WaitTimeout(f"task {self.task_id}: no event for {self.idle_timeout:g} s")

    # -- internals -----------------------------------------------------------------------------
    def _log_start(self) -> str:
        cursor = self._batch_cursor or self.log_cursor
        return "-" if cursor is None else "(" + cursor

    def _settle_log(self) -> None:
        """A whole log read is in: take the due events; end at the last terminal event that no
        later run's task.queued follows."""
        batch, self._batch = self._batch, []
        if self._batch_cursor is not None:
            self.log_cursor, self._batch_cursor = self._batch_cursor, None
        self._catching_up = False
        if self.done:
            return
        due: list[dict[str, Any]] = []
        end: int | None = None
        for event in batch:
            if event["seq"] <= self.last_seq:
                continue  # old ones are skipped
            if event["seq"] > self.last_seq + 1:  # a hole the log cannot fill: Redis lost those events
                due.append(gap_event(self.task_id, self.last_seq + 1, event["seq"] - 1))
            self.last_seq = event["seq"]
            due.append(event)
            if ev.is_terminal(event):
                end = len(due) - 1
            elif event["type"] == ev.QUEUED:
                end = None
        if end is not None:
            due = due[:end + 1]
            self.done = True
        self._pending.extend(due)

    def _take(self, event: dict[str, Any]) -> None:
        self.last_seq = event["seq"]
        self._pending.append(event)


def gap_event(task_id: str, from_seq: int, to_seq: int) -> dict[str, Any]:
    """`stream.gap`: events from_seq..to_seq existed but can no longer be read (never published; made
    by a follower). It carries seq = to_seq, so a cursor taken from it resumes after the hole."""
    return {"seq": to_seq, "task_id": task_id, "type": ev.STREAM_GAP, "ts": time.time(),
            "from_seq": from_seq, "to_seq": to_seq}


def event_from_row(record: Any, seq: int) -> dict[str, Any]:
    """The terminal event of a terminal row (its event never reached the log), marked `from_row`."""
    type_ = ev.EVENT_OF_STATUS[record.status]
    event: dict[str, Any] = {"seq": seq, "task_id": record.id, "type": type_, "ts": time.time(),
                             "attempt": record.attempts, "run": getattr(record, "run", 0), "from_row": True}
    if type_ == ev.COMPLETED:
        event.update(reasoning=record.reasoning or "", answer=record.answer or "", usage=record.usage or {},
                     cost=cost_as_text(record.cost) or {}, timings=record.timings or {},
                     metadata=(record.request or {}).get("metadata") or {})
    elif type_ == ev.FAILED:
        code = record.error_code or "internal"
        event["error"] = {"code": code, "message": record.error_message or "",
                          "retryable": ERROR_CODES.get(code, False)}
    return event
