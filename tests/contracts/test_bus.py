"""The event bus on real Redis: atomic seq, replay for late subscribers, resume, no duplicates."""

from __future__ import annotations

import threading
import time

import redis

from contracts import events as ev
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
    assert 0 < redis_client.ttl(ev.log_key("t5")) <= 100
    assert 0 < redis_client.ttl(ev.seq_key("t5")) <= 100


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
