"""The event bus on real Redis: atomic seq, replay for late subscribers, resume, no duplicates."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from contracts import events as ev
from contracts import keys
from contracts.bus import EventBus


def test_a_late_subscriber_gets_every_event_once_in_order(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)
    for i in range(5):
        bus.publish("t1", ev.REASONING_DELTA, 1, text=str(i))
    received: list[dict] = []
    reader = threading.Thread(target=lambda: received.extend(bus.subscribe("t1", timeout=10)))
    reader.start()
    time.sleep(0.2)
    for i in range(5, 10):
        bus.publish("t1", ev.ANSWER_DELTA, 1, text=str(i))
    bus.publish("t1", ev.COMPLETED, 1)
    reader.join(10)
    assert [e["seq"] for e in received] == list(range(1, 12))
    assert "".join(e.get("text", "") for e in received) == "0123456789"


def test_a_subscriber_after_the_end_replays_everything_and_stops(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)
    bus.publish("t2", ev.QUEUED, 0, model="qvq-max", image_count=1)
    bus.publish("t2", ev.FAILED, 1, error={"code": "internal", "message": "x", "retryable": False})
    events = list(bus.subscribe("t2", timeout=5))
    assert [e["type"] for e in events] == [ev.QUEUED, ev.FAILED]


def test_resume_from_a_seq_gets_exactly_the_rest(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)
    for i in range(6):
        bus.publish("t3", ev.ANSWER_DELTA, 1, text=str(i))
    bus.publish("t3", ev.COMPLETED, 1)
    assert [e["seq"] for e in bus.subscribe("t3", from_seq=4, timeout=5)] == [5, 6, 7]


def test_two_publishers_never_share_or_skip_a_seq(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)

    def publish_many() -> None:
        for _ in range(300):
            bus.publish("t4", ev.ANSWER_DELTA, 1, text="x")

    threads = [threading.Thread(target=publish_many) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seqs = [e["seq"] for e in bus.read_log("t4")]
    assert seqs == list(range(1, 601))


def test_the_log_and_counter_expire(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client, ttl_s=100)
    bus.publish("t5", ev.QUEUED, 0)
    assert 0 < redis_client.ttl(keys.log_key("t5")) <= 100
    assert 0 < redis_client.ttl(keys.seq_key("t5")) <= 100


def test_a_quiet_task_times_out(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)
    bus.publish("t6", ev.QUEUED, 0)
    started = time.monotonic()
    try:
        list(bus.subscribe("t6", timeout=0.5))
    except TimeoutError:
        pass
    else:
        raise AssertionError("expected a TimeoutError")
    assert time.monotonic() - started < 3


def test_seq_never_goes_below_the_floor(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)
    assert bus.publish("f1", ev.QUEUED, 0) == 1
    assert bus.publish("f1", ev.STARTED, 1, seq_floor=40) == 41  # Redis had lost the counter: 40 existed
    assert bus.publish("f1", ev.ANSWER_DELTA, 1, seq_floor=3, text="x") == 42  # a low floor changes nothing
    assert bus.publish("f1", ev.COMPLETED, 1) == 43
    assert [e["seq"] for e in bus.read_log("f1")] == [1, 41, 42, 43]


def _retried_log(bus: EventBus, task_id: str) -> None:
    bus.publish(task_id, ev.QUEUED, 0, run=0)
    bus.publish(task_id, ev.STARTED, 1, worker="w")
    bus.publish(task_id, ev.ANSWER_DELTA, 1, text="first run ")
    bus.publish(task_id, ev.FAILED, 1, error={"code": "model.timeout", "message": "x", "retryable": True})
    bus.publish(task_id, ev.QUEUED, 1, run=1)
    bus.publish(task_id, ev.STARTED, 2, worker="w")
    bus.publish(task_id, ev.ANSWER_DELTA, 2, text="second run")


def test_a_viewer_from_zero_ends_at_the_latest_runs_terminal_event(redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)
    _retried_log(bus, "run1")
    received: list[dict] = []
    reader = threading.Thread(target=lambda: received.extend(bus.subscribe("run1", timeout=10)))
    reader.start()
    deadline = time.monotonic() + 5
    while len(received) < 7:  # the replay went past the first run's task.failed
        assert time.monotonic() < deadline and reader.is_alive(), [e["type"] for e in received]
        time.sleep(0.01)
    bus.publish("run1", ev.COMPLETED, 2, answer="second run")
    reader.join(10)
    assert [e["type"] for e in received][-4:] == [ev.QUEUED, ev.STARTED, ev.ANSWER_DELTA, ev.COMPLETED]
    assert [e["seq"] for e in received] == list(range(1, 9))
    # Replayed after the end, the same.
    assert list(bus.subscribe("run1", timeout=5)) == received


def test_a_viewer_ends_via_the_row_when_the_terminal_event_never_reached_the_log(
        redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from contracts.bus import subscription

    monkeypatch.setattr(subscription, "ROW_CHECK_S", 0.2)
    monkeypatch.setattr(subscription, "ROW_GRACE_S", 0.1)
    bus = EventBus(redis_client)
    bus.publish("row1", ev.QUEUED, 0)

    class Row:
        id, status, attempts, run, last_seq, request = "row1", "running", 1, 0, 1, {}
        error_code, error_message = "model.unavailable", "gone"

    reads: list[str] = []

    def read_row(task_id: str) -> Row:
        reads.append(task_id)
        if len(reads) >= 2:
            Row.status = "failed"
        return Row()

    events = list(bus.subscribe("row1", timeout=10, row=read_row))
    assert [e["type"] for e in events] == [ev.QUEUED, ev.FAILED]
    assert events[-1]["from_row"] is True and events[-1]["seq"] == 2
    assert events[-1]["error"]["code"] == "model.unavailable"


def test_a_subscriber_across_a_redis_restart_without_persistence_gets_the_rest(tmp_path: Any) -> None:
    from producer.local.embedded import EmbeddedRedis

    with EmbeddedRedis() as server:
        client = redis.Redis.from_url(server.url)
        bus = EventBus(client)
        for _ in range(3):
            bus.publish("rs1", ev.ANSWER_DELTA, 1, text="a")
        received: list[dict] = []
        reader = threading.Thread(target=lambda: received.extend(
            bus.subscribe("rs1", timeout=20, row=lambda _id: None)))
        reader.start()
        deadline = time.monotonic() + 5
        while len(received) < 3:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        server.stop()
        server.start()  # empty: the counter and the log are gone
        publisher = EventBus(redis.Redis.from_url(server.url))
        assert publisher.publish("rs1", ev.ANSWER_DELTA, 1, seq_floor=3, text="b") == 4
        publisher.publish("rs1", ev.COMPLETED, 1, seq_floor=3)
        reader.join(15)
        assert [e["seq"] for e in received] == [1, 2, 3, 4, 5]
        publisher.redis.close()
        client.close()
