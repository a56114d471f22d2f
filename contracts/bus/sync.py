"""The event bus for threads: publishing, reading the log, and the synchronous subscriber (log first, then
live, deduplicated by seq) that every sync viewer uses. Each subscription's decisions are
`SubscriptionState`'s (contracts/bus/subscription.py); this module only performs them with redis-py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from typing import Any

import redis

from contracts import keys
from contracts.bus.publish import (
    BATCH_PUBLISH_LUA,
    CONFIRM_S,
    PUBLISH_LUA,
    RECONNECTABLE,
    LostEvents,
    batch_publish_args,
    is_subscribe_confirmation,
    publish_args,
)
from contracts.bus.subscription import (
    END,
    READ_BATCH,
    READ_ROW,
    SUBSCRIBE,
    Deliver,
    LogRead,
    ReadLog,
    Sleep,
    SubscriptionState,
)

RowReader = Callable[[str], Any]  # task id -> its row (contracts.store.TaskRecord) or None


class EventBus:
    """Publishes and reads one task's events. Thread-safe: redis-py pools its connections."""

    def __init__(self, client: redis.Redis, *, ttl_s: int = 86_400) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._publish = client.register_script(PUBLISH_LUA)
        self._publish_batch = client.register_script(BATCH_PUBLISH_LUA)
        self.lost = LostEvents()

    def publish(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0, **fields: Any) -> int:
        """Append one event to the log and the channel; returns its seq (above `seq_floor`, always). After
        a failed publish of this task's, the seq skips one: followers see the hole (`stream.gap`)."""
        script_keys, event = publish_args(task_id, type_, attempt, fields)
        skip = self.lost.take(task_id)
        try:
            return int(self._publish(keys=script_keys, args=[event, self.ttl_s, int(seq_floor), skip]))
        except Exception:
            self.lost.note(task_id)
            raise

    def publish_many(self, events: list[tuple[str, str, int, int, dict[str, Any]]]) -> list[int]:
        """Many tasks' events in one pipelined round trip: (task id, type, attempt, seq floor, fields) each;
        their seqs, in order. For the bulk steps of a batch (queue, cancel)."""
        pipe = self.redis.pipeline(transaction=False)
        for task_id, type_, attempt, floor, fields in events:
            script_keys, event = publish_args(task_id, type_, attempt, fields)
            self._publish(keys=script_keys, args=[event, self.ttl_s, floor, 0], client=pipe)
        return [int(seq) for seq in pipe.execute()]

    def publish_batch(self, batch_id: str, type_: str, *, final: bool = False, **fields: Any) -> int | None:
        """One event of a batch (batch.progress, batch.completed) on its own log and channel; its seq, or None
        when a later tally (more items done in the round) was published already. `final` publishes anyway."""
        script_keys, event = batch_publish_args(batch_id, type_, fields)
        seq = int(self._publish_batch(keys=script_keys, args=[event, self.ttl_s, int(fields.get("round", 0)),
                                                              int(fields.get("done", 0)), "1" if final else "0"]))
        return seq or None

    def note_lost(self, task_id: str) -> None:
        """An event of this task was dropped without a try (a publisher's cooldown): mark the hole."""
        self.lost.note(task_id)

    def publish_soon(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0,
                     **fields: Any) -> asyncio.Future[int]:
        """`publish` for code on an event loop: a future of the seq. Here it publishes at once (one
        blocking round trip); the worker's bus (worker/stream/publisher.py) queues and group-commits."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        try:
            future.set_result(self.publish(task_id, type_, attempt, seq_floor=seq_floor, **fields))
        except Exception as exc:
            future.set_exception(exc)
        return future

    def read_log(self, task_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """Every logged event with seq > after_seq, in log order."""
        return self._read_log(keys.log_key(task_id), after_seq)

    def read_batch_log(self, batch_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        """A batch's logged events with seq > after_seq."""
        return self._read_log(keys.batch_stream_keys(batch_id)[1], after_seq)

    def _read_log(self, log: str, after_seq: int) -> list[dict[str, Any]]:
        read = LogRead(after_seq)
        while not read.take(self.redis.xrange(log, min=read.start(), count=READ_BATCH) or []):
            pass
        return read.events

    def last_seq(self, task_id: str) -> int:
        value = self.redis.get(keys.seq_key(task_id))
        return int(value) if value else 0

    def subscribe(
        self, task_id: str, *, from_seq: int = 0, timeout: float | None = None, idle_timeout: float | None = None,
        row: RowReader | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Yield every event with seq > from_seq exactly once, in seq order, ending after the terminal
        event of the task's latest run (contracts/bus/subscription.py has the rules).

        Subscribes to the channel (and waits for the server to confirm it) before reading the log, so
        nothing published in between is missed; a gap in the live seq (a message dropped on a
        reconnect) is filled from the log, which is also re-read whenever the channel is quiet.
        `row(task_id)` reads the task's row: with it, a terminal row ends the subscription even when
        its event never reached the log, and a lost Redis is waited for. Raises WaitTimeout (a
        TimeoutError) when `timeout` (total) or `idle_timeout` (no event) passes first.
        """
        state = SubscriptionState(task_id, from_seq, timeout, idle_timeout, checks_row=row is not None)
        return _drive(self.redis, state, row)


def _drive(client: redis.Redis, state: SubscriptionState, row: RowReader | None) -> Iterator[dict[str, Any]]:
    """Perform the state's actions with redis-py; the only code here is I/O."""
    pubsub: redis.client.PubSub | None = None
    try:
        while (action := state.next()) is not END:
            if isinstance(action, Deliver):
                yield action.event
                state.delivered()
                continue
            if isinstance(action, Sleep):
                time.sleep(action.seconds)
            elif action is READ_ROW:
                state.take_row(_read_row(row, state.task_id))
            else:
                pubsub = _perform(client, pubsub, state, action)
    finally:
        if pubsub is not None:
            pubsub.close()


def _perform(client: redis.Redis, pubsub: redis.client.PubSub | None, state: SubscriptionState,
             action: Any) -> redis.client.PubSub | None:
    """One Redis action: subscribe, read the log, or wait for a live message; returns the pub/sub in use."""
    try:
        if action is SUBSCRIBE:
            if pubsub is not None:
                pubsub.close()
            pubsub = client.pubsub()  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8
            _subscribe(pubsub, keys.channel(state.task_id))
            state.subscribed()
        elif isinstance(action, ReadLog):
            state.take_log(client.xrange(keys.log_key(state.task_id), min=action.start, count=READ_BATCH) or [])
        else:
            assert pubsub is not None
            state.take_message(pubsub.get_message(timeout=action.timeout))
    except RECONNECTABLE as error:  # Redis restarted, failed over, or dropped us: resubscribe
        state.connection_lost(error)
    return pubsub


def _subscribe(pubsub: redis.client.PubSub, channel: str) -> None:
    pubsub.subscribe(channel)
    # SUBSCRIBE and XRANGE go over different connections: wait for the confirmation, or an event
    # published in between could be in neither (it would come from the next log read, late).
    give_up = time.monotonic() + CONFIRM_S
    while (remaining := give_up - time.monotonic()) > 0:
        if is_subscribe_confirmation(pubsub.get_message(timeout=remaining)):
            return


def _read_row(row: RowReader | None, task_id: str) -> Any:
    if row is None:
        return None
    try:
        return row(task_id)
    except Exception:  # the database is unreachable: the row is read again later
        return None
