"""Redis and database outages: an enqueue fails fast and leaves nothing queued; a Redis restart
mid-stream leaves no task running and worker and producer reconnect on their own; events that cannot
be published never block the persisted result; a database outage at the terminal write is retried,
and past that the message goes back to the queue and the task resumes later."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from celery.exceptions import Reject

from contracts import events as ev
from contracts import retry
from contracts.errors import ERROR_CODES, EnqueueError
from contracts.settings import Settings
from producer.client import Client
from producer.local.embedded import free_port
from tests.reliability import Stack, after_last_retry, terminal_events, text_of
from worker import pipeline
from worker.context import WorkerContext

pytestmark = pytest.mark.timeout(120)


def test_enqueue_while_redis_is_down_fails_within_seconds_and_leaves_nothing_queued(tmp_path: Path) -> None:
    closed = f"redis://127.0.0.1:{free_port()}/0"
    client = Client(Settings.from_env({"REDIS_URL": closed, "DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}"}))
    image = tmp_path / "a.png"
    image.write_bytes(b"not needed: the enqueue fails first")
    started = time.monotonic()
    with pytest.raises(EnqueueError, match="could not enqueue") as caught:
        client.submit(images=[str(image)], prompt="Anyone there?", task_id="outage-1")
    assert time.monotonic() - started < 5
    assert "Connection refused" in str(caught.value) or "Error" in str(caught.value)
    assert client.store.list_tasks(status="queued") == []
    record = client.get("outage-1")
    assert record.status == "failed" and record.error_code == "internal"
    client.close()


def test_enqueue_while_only_the_broker_is_down_ends_the_event_log_and_can_be_retried(make_stack: Any) -> None:
    stack: Stack = make_stack()
    broken = Client(Settings.from_env({**stack.env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"}))
    started = time.monotonic()
    with pytest.raises(EnqueueError):
        broken.submit(images=[str(stack.image)], prompt="Broker down.", task_id="outage-2")
    assert time.monotonic() - started < 5
    events = stack.events("outage-2")
    assert [e["type"] for e in events] == [ev.QUEUED, ev.FAILED]  # a subscriber sees an end
    assert events[-1]["error"]["retryable"] is True
    broken.close()

    from_seq = stack.client.retry("outage-2")  # once the broker is back: same task, queued again
    assert from_seq == 2 and stack.record("outage-2").status == "queued"
    stack.start_worker(concurrency=2)
    assert stack.wait_terminal(["outage-2"], timeout=20)["outage-2"].status == "completed"


def test_a_redis_restart_mid_stream_leaves_nothing_running_and_everyone_reconnects(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start_worker(concurrency=10)
    ids = [stack.submit(f"Through a Redis restart, number {n}.", tps=40, reasoning_tokens=100) for n in range(4)]
    for task_id in ids:
        stack.wait_events(task_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    followed: dict[str, list[dict[str, Any]]] = {}
    followers = [threading.Thread(target=lambda t=task_id: followed.__setitem__(t, list(stack.client.events(
        t, timeout=60))), daemon=True) for task_id in ids[:2]]
    for follower in followers:
        follower.start()
    stack.redis_server.stop()
    time.sleep(1.5)
    stack.redis_server.start()  # same port, empty (no persistence): queue, logs and seq counters are gone

    records = stack.wait_terminal(ids, timeout=40)
    for follower in followers:
        follower.join(timeout=60)
    for task_id, events in followed.items():  # a live view never passes a hole off as the whole text
        final = after_last_retry(events)
        record = records[task_id]
        if record.status == "completed" and not any(e["type"] == ev.STREAM_GAP for e in final):
            assert text_of(final, ev.ANSWER_DELTA) == record.answer
            assert text_of(final, ev.REASONING_DELTA) == record.reasoning
    for record in records.values():
        assert record.status in ("completed", "failed"), record
        if record.status == "failed":
            assert record.error_code in ERROR_CODES and record.error_message
        else:
            assert record.answer and len(stack.client.store.usage_rows(record.id)) == 1
    assert stack.client.store.list_tasks(status="running") == []
    stack.wait_no_active_streams()

    # The same producer client and the same worker carry on: a new task runs end to end...
    after = stack.submit("After the restart.")
    events = stack.client.events(after, timeout=30)
    types = [e["type"] for e in events]
    assert types[0] == ev.QUEUED and types[-1] == ev.COMPLETED
    # ...and a cancel reaches the worker's (re-subscribed) cancel watcher.
    long_id = stack.submit("A long one after the restart.", tps=40, reasoning_tokens=200)
    stack.wait_events(long_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    stack.client.cancel(long_id)
    assert stack.wait_no_active_streams(timeout=3) < 1.0
    assert stack.wait_terminal([long_id], timeout=10)[long_id].status == "cancelled"


# -- in-process runs (no Celery): the pipeline against a failing bus or store -----------------------
@pytest.fixture()
def inproc(make_stack: Any) -> Iterator[tuple[Stack, WorkerContext]]:
    stack: Stack = make_stack()
    ctx = WorkerContext.build(Settings.from_env(stack.env))
    yield stack, ctx
    ctx.close()


class FailingBus:
    """The real bus, except that chosen publishes raise as if Redis were gone."""

    def __init__(self, bus: Any, *, deltas: bool = False, terminal_failures: int = 0, everything: bool = False):
        self.bus = bus
        self.deltas = deltas
        self.terminal_failures = terminal_failures
        self.everything = everything
        self.calls: list[str] = []

    def publish(self, task_id: str, type_: str, attempt: int, **fields: Any) -> int:
        self.calls.append(type_)
        if self.everything or (self.deltas and type_ in ev.DELTA_TYPES):
            raise redis.ConnectionError("Redis is gone (test)")
        if ev.is_terminal({"type": type_}) and self.terminal_failures:
            self.terminal_failures -= 1
            raise redis.ConnectionError("Redis is gone (test)")
        return int(self.bus.publish(task_id, type_, attempt, **fields))

    def publish_soon(self, task_id: str, type_: str, attempt: int, **fields: Any) -> Any:
        self.calls.append(type_)
        if self.everything or (self.deltas and type_ in ev.DELTA_TYPES):
            failed = asyncio.get_running_loop().create_future()
            failed.set_exception(redis.ConnectionError("Redis is gone (test)"))
            return failed
        return self.bus.publish_soon(task_id, type_, attempt, **fields)

    def note_lost(self, task_id: str) -> None:
        self.bus.note_lost(task_id)


class FailingStore:
    """The real store, except that finish() (or everything) raises like a lost database connection."""

    def __init__(self, store: Any, *, finish_failures: int = 0, down: bool = False) -> None:
        self.store = store
        self.finish_failures = finish_failures
        self.down = down

    def _error(self) -> sa.exc.OperationalError:
        return sa.exc.OperationalError("UPDATE qvq_tasks", {}, ConnectionRefusedError("database is gone (test)"))

    def finish(self, *args: Any) -> Any:
        if self.down or self.finish_failures:
            self.finish_failures = max(0, self.finish_failures - 1)
            raise self._error()
        return self.store.finish(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


def test_failed_publishes_never_block_the_persisted_result(inproc: Any) -> None:
    stack, ctx = inproc
    task_id = stack.submit("Publish what you can.", tps=200)
    bus = FailingBus(ctx.bus, deltas=True, terminal_failures=2)
    assert pipeline.run_task(stack.record(task_id).request, dataclasses.replace(ctx, bus=bus)) == "completed"
    record = stack.record(task_id)
    assert record.status == "completed" and record.reasoning and record.answer
    events = stack.events(task_id)
    assert [e["type"] for e in events] == [ev.QUEUED, ev.STARTED, ev.IMAGES_READY, ev.COMPLETED]
    assert events[-1]["reasoning"] == record.reasoning  # published on its third try
    assert bus.calls.count(ev.COMPLETED) == 3
    # After the first failed delta publish the others were skipped without asking Redis each time.
    assert bus.calls.count(ev.REASONING_DELTA) + bus.calls.count(ev.ANSWER_DELTA) <= 3


def test_with_redis_gone_for_the_whole_run_the_result_is_still_persisted(inproc: Any) -> None:
    stack, ctx = inproc
    task_id = stack.submit("Nobody is listening.", tps=200)
    started = time.monotonic()
    outcome = pipeline.run_task(stack.record(task_id).request, dataclasses.replace(ctx, bus=FailingBus(ctx.bus, everything=True)))
    assert outcome == "completed" and time.monotonic() - started < 10
    assert stack.record(task_id).status == "completed"
    assert len(stack.client.store.usage_rows(task_id)) == 1


def test_a_short_database_outage_at_the_terminal_write_is_retried(inproc: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    stack, ctx = inproc
    monkeypatch.setattr(retry, "DATABASE", dataclasses.replace(retry.DATABASE, delays=(0.05,) * 5))
    task_id = stack.submit("Write it down eventually.")
    store = FailingStore(ctx.store, finish_failures=3)
    assert pipeline.run_task(stack.record(task_id).request, dataclasses.replace(ctx, store=store)) == "completed"
    assert stack.record(task_id).status == "completed"
    assert len(stack.client.store.usage_rows(task_id)) == 1
    assert len(terminal_events(stack.events(task_id))) == 1


def test_a_long_database_outage_puts_the_message_back_and_the_task_resumes(
    inproc: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    stack, ctx = inproc
    monkeypatch.setattr(retry, "DATABASE", dataclasses.replace(retry.DATABASE, delays=(0.01, 0.01)))
    task_id = stack.submit("The database is away.")
    payload = stack.record(task_id).request
    down = dataclasses.replace(ctx, store=FailingStore(ctx.store, down=True))

    # The Celery task turns StoreUnavailable into Reject(requeue=True): the broker keeps the message.
    from worker import tasks

    monkeypatch.setattr(tasks, "get_context", lambda: down)
    monkeypatch.setattr(retry, "REQUEUE_PAUSE_S", 0.0)
    with pytest.raises(Reject) as rejected:
        tasks.reason.run(payload)
    assert rejected.value.requeue is True
    assert stack.record(task_id).status == "running"  # nothing terminal was written or published
    assert terminal_events(stack.events(task_id)) == []

    # The message comes back once the database answers: a new attempt completes the task once.
    assert pipeline.run_task(payload, ctx) == "completed"
    record = stack.record(task_id)
    assert record.status == "completed" and record.attempts == 2
    # both attempts streamed a whole answer and the service billed both: the ledger has both (attempt 1's
    # row was written when its call ended, before the terminal write failed); the result is written once
    assert [b["attempt"] for b in stack.client.store.usage_rows(task_id)] == [1, 2]
    events = stack.events(task_id)
    assert [e["attempt"] for e in events if e["type"] == ev.STARTED] == [1, 2]
    assert text_of([e for e in events if e["attempt"] == 2], ev.REASONING_DELTA) == record.reasoning
