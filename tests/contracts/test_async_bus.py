"""The asyncio subscriber on real Redis, and its parity with the sync one (they share SubscriptionState):
late subscribers, resume, gaps filled from the log, holes in the log, timeouts that a busy stream or
a slow consumer cannot hold off, and the pub/sub connection released on an early close."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from contextlib import aclosing
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from contracts import events as ev
from contracts import keys
from contracts.bus import EventBus
from contracts.bus.aio import AsyncEventBus

pytestmark = pytest.mark.timeout(30)


def run(redis_url: str, body: Callable[[AsyncEventBus], Any]) -> Any:
    """Run `body(bus)` on a fresh event loop with an async bus on the test Redis."""

    async def main() -> Any:
        client = aioredis.Redis.from_url(redis_url)
        try:
            return await body(AsyncEventBus(client))
        finally:
            await client.aclose()

    return asyncio.run(main())


async def collect(bus: AsyncEventBus, task_id: str, **kwargs: Any) -> list[dict[str, Any]]:
    return [event async for event in bus.subscribe(task_id, **kwargs)]


def sync_collect(bus: EventBus, task_id: str, **kwargs: Any) -> list[dict[str, Any]]:
    return list(bus.subscribe(task_id, **kwargs))


def test_a_late_subscriber_after_half_the_events_gets_each_once_in_order(
        redis_url: str, redis_client: redis.Redis) -> None:
    sync_bus = EventBus(redis_client)
    for i in range(5):
        sync_bus.publish("a1", ev.REASONING_DELTA, 1, text=f"r{i}")

    async def body(bus: AsyncEventBus) -> list[dict[str, Any]]:
        reader = asyncio.create_task(collect(bus, "a1", timeout=10))
        await asyncio.sleep(0.2)  # the reader has replayed the first half and is live
        for i in range(5):
            await bus.publish("a1", ev.ANSWER_DELTA, 1, text=f"a{i}")
        await bus.publish("a1", ev.COMPLETED, 1, answer="a0a1a2a3a4")
        return await reader

    events = run(redis_url, body)
    assert [e["seq"] for e in events] == list(range(1, 12))
    assert "".join(e.get("text", "") for e in events) == "r0r1r2r3r4a0a1a2a3a4"
    assert events[-1]["type"] == ev.COMPLETED


def test_a_subscriber_after_the_end_replays_everything_and_stops(redis_url: str, redis_client: redis.Redis) -> None:
    async def body(bus: AsyncEventBus) -> list[dict[str, Any]]:
        await bus.publish("a2", ev.QUEUED, 0, model="qvq-max", image_count=1)
        for i in range(3):
            await bus.publish("a2", ev.ANSWER_DELTA, 1, text=str(i))
        await bus.publish("a2", ev.COMPLETED, 1)
        started = time.monotonic()
        events = await collect(bus, "a2", timeout=5)
        assert time.monotonic() - started < 1  # ends at the terminal event, does not wait
        return events

    events = run(redis_url, body)
    assert [e["type"] for e in events] == [ev.QUEUED] + [ev.ANSWER_DELTA] * 3 + [ev.COMPLETED]
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]


def test_resume_from_a_seq_gets_exactly_the_rest_live_or_replayed(redis_url: str, redis_client: redis.Redis) -> None:
    async def body(bus: AsyncEventBus) -> tuple[list[int], list[int]]:
        for i in range(6):
            await bus.publish("a3", ev.ANSWER_DELTA, 1, text=str(i))
        reader = asyncio.create_task(collect(bus, "a3", from_seq=4, timeout=5))
        await asyncio.sleep(0.1)
        await bus.publish("a3", ev.ANSWER_DELTA, 1, text="6")
        await bus.publish("a3", ev.FAILED, 1, error={"code": "internal", "message": "x", "retryable": False})
        live = [e["seq"] for e in await reader]
        replayed = [e["seq"] async for e in bus.subscribe("a3", from_seq=6)]
        return live, replayed

    live, replayed = run(redis_url, body)
    assert live == [5, 6, 7, 8]
    assert replayed == [7, 8]


def test_async_and_sync_subscribers_see_the_same_run(redis_url: str, redis_client: redis.Redis) -> None:
    """Both subscribe mid-run while a publisher thread streams 300 events: identical sequences."""
    sync_bus = EventBus(redis_client)
    sync_bus.publish("a4", ev.QUEUED, 0)
    sync_seen: list[dict[str, Any]] = []

    def publish() -> None:
        for i in range(300):
            sync_bus.publish("a4", ev.ANSWER_DELTA, 1, text=str(i % 10))
            if i % 50 == 0:
                time.sleep(0.01)
        sync_bus.publish("a4", ev.COMPLETED, 1)

    sync_reader = threading.Thread(target=lambda: sync_seen.extend(sync_bus.subscribe("a4", timeout=20)))
    publisher = threading.Thread(target=publish)
    sync_reader.start()
    publisher.start()

    async def body(bus: AsyncEventBus) -> list[dict[str, Any]]:
        return await collect(bus, "a4", timeout=20)

    async_seen = run(redis_url, body)
    publisher.join()
    sync_reader.join()
    assert [e["seq"] for e in async_seen] == list(range(1, 303))
    assert async_seen == sync_seen


def _drop_live(client: redis.Redis, task_id: str, type_: str, **fields: Any) -> int:
    """An event that reached the log but whose pub/sub message was lost (as on a reconnect)."""
    import json

    seq = int(client.incr(keys.seq_key(task_id)))
    event = {"seq": seq, "task_id": task_id, "type": type_, "ts": time.time(), "attempt": 1, **fields}
    client.xadd(keys.log_key(task_id), {"event": json.dumps(event)})
    return seq


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_lost_live_message_is_filled_from_the_log(flavour: str, redis_url: str, redis_client: redis.Redis) -> None:
    sync_bus = EventBus(redis_client)
    sync_bus.publish("g1", ev.QUEUED, 0)

    def feed() -> None:
        time.sleep(0.3)
        _drop_live(redis_client, "g1", ev.ANSWER_DELTA, text="lost")  # seq 2: in the log only
        sync_bus.publish("g1", ev.ANSWER_DELTA, 1, text="next")  # seq 3: the gap triggers a log read
        time.sleep(0.3)
        _drop_live(redis_client, "g1", ev.COMPLETED)  # the terminal event lost too: the quiet poll finds it

    feeder = threading.Thread(target=feed)
    feeder.start()
    started = time.monotonic()
    if flavour == "sync":
        events = sync_collect(sync_bus, "g1", timeout=10)
    else:
        events = run(redis_url, lambda bus: collect(bus, "g1", timeout=10))
    feeder.join()
    assert [e["seq"] for e in events] == [1, 2, 3, 4]
    assert [e.get("text") for e in events[1:3]] == ["lost", "next"]
    assert time.monotonic() - started < 3


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_hole_in_the_log_does_not_stall_the_subscriber(flavour: str, redis_url: str,
                                                         redis_client: redis.Redis) -> None:
    """An entry gone from the log (trimmed, lost in a failover) can never be filled: say so with a
    stream.gap over exactly the missing seqs, and go on."""
    sync_bus = EventBus(redis_client)
    for i in range(4):
        sync_bus.publish("h1", ev.ANSWER_DELTA, 1, text=str(i))
    sync_bus.publish("h1", ev.COMPLETED, 1)
    second = redis_client.xrange(keys.log_key("h1"))[1][0]
    redis_client.xdel(keys.log_key("h1"), second)
    if flavour == "sync":
        events = sync_collect(sync_bus, "h1", timeout=3)
    else:
        events = run(redis_url, lambda bus: collect(bus, "h1", timeout=3))
    assert [(e["seq"], e["type"]) for e in events] == [
        (1, ev.ANSWER_DELTA), (2, ev.STREAM_GAP), (3, ev.ANSWER_DELTA), (4, ev.ANSWER_DELTA), (5, ev.COMPLETED)]
    assert (events[1]["from_seq"], events[1]["to_seq"]) == (2, 2)


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_the_total_timeout_holds_against_a_busy_stream_and_a_slow_consumer(
        flavour: str, redis_url: str, redis_client: redis.Redis) -> None:
    sync_bus = EventBus(redis_client)
    stop = threading.Event()

    def publish() -> None:
        while not stop.is_set():
            sync_bus.publish("b1", ev.ANSWER_DELTA, 1, text="x")
            time.sleep(0.005)

    publisher = threading.Thread(target=publish)
    publisher.start()
    started = time.monotonic()
    try:
        with pytest.raises(TimeoutError):
            if flavour == "sync":
                for _event in sync_bus.subscribe("b1", timeout=0.5):
                    time.sleep(0.02)  # slower than the publisher: a message is always waiting
                    assert time.monotonic() - started < 5, "the timeout was never enforced"
            else:
                async def slow(bus: AsyncEventBus) -> None:
                    async for _event in bus.subscribe("b1", timeout=0.5):
                        await asyncio.sleep(0.02)
                        assert time.monotonic() - started < 5, "the timeout was never enforced"

                run(redis_url, slow)
    finally:
        stop.set()
        publisher.join()
    assert time.monotonic() - started < 2


def test_idle_timeout_and_total_timeout(redis_url: str, redis_client: redis.Redis) -> None:
    async def body(bus: AsyncEventBus) -> tuple[float, float]:
        await bus.publish("q1", ev.QUEUED, 0)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no event for 0.3 s"):
            await collect(bus, "q1", idle_timeout=0.3)
        idle = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no terminal event"):
            await collect(bus, "q1", timeout=0.3)
        return idle, time.monotonic() - started

    idle, total = run(redis_url, body)
    assert 0.25 < idle < 1.5 and 0.25 < total < 1.5


def test_closing_early_releases_the_subscription(redis_url: str, redis_client: redis.Redis) -> None:
    async def body(bus: AsyncEventBus) -> tuple[int, int]:
        await bus.publish("c1", ev.QUEUED, 0)
        await bus.publish("c1", ev.STARTED, 1, worker="w")
        async with aclosing(bus.subscribe("c1")) as events:
            async for _event in events:
                break
            during = dict(await bus.redis.pubsub_numsub(keys.channel("c1")))
        after = dict(await bus.redis.pubsub_numsub(keys.channel("c1")))
        return during[keys.channel("c1").encode()], after[keys.channel("c1").encode()]

    assert run(redis_url, body) == (1, 0)


def test_read_log_last_seq_and_last_event(redis_url: str, redis_client: redis.Redis) -> None:
    async def body(bus: AsyncEventBus) -> None:
        assert await bus.last_event("r1") is None and await bus.last_seq("r1") == 0
        for i in range(3):
            await bus.publish("r1", ev.ANSWER_DELTA, 1, text=str(i))
        assert [e["seq"] for e in await bus.read_log("r1", after_seq=1)] == [2, 3]
        assert await bus.last_seq("r1") == 3
        assert (await bus.last_event("r1") or {})["text"] == "2"

    run(redis_url, body)
    # The async publisher writes exactly what the sync one does.
    assert [e["text"] for e in EventBus(redis_client).read_log("r1")] == ["0", "1", "2"]


def _kill(client: redis.Redis, sockname: tuple[str, int]) -> None:
    """Drop exactly one connection, server side (as a restart, failover or CLIENT KILL would)."""
    client.client_kill_filter(_type=None, addr=f"{sockname[0]}:{sockname[1]}")


def _capture_sync_pubsub(client: redis.Redis, sockets: list[tuple[str, int]]) -> None:
    """Record the local address of the first pub/sub connection the client subscribes with."""
    original = client.pubsub

    def capturing_pubsub(**kwargs: Any) -> Any:
        pubsub = original(**kwargs)
        real_subscribe = pubsub.subscribe

        def subscribe(*args: Any) -> Any:
            result = real_subscribe(*args)
            sockets[:] = sockets or [pubsub.connection._sock.getsockname()]
            return result

        pubsub.subscribe = subscribe
        return pubsub

    client.pubsub = capturing_pubsub  # type: ignore[method-assign]


def _capture_async_pubsub(client: aioredis.Redis, sockets: list[tuple[str, int]]) -> None:
    original = client.pubsub

    def capturing_pubsub(**kwargs: Any) -> Any:
        pubsub = original(**kwargs)
        real_subscribe = pubsub.subscribe

        async def subscribe(*args: Any) -> Any:
            result = await real_subscribe(*args)
            sockets[:] = sockets or [pubsub.connection._writer.get_extra_info("sockname")]
            return result

        pubsub.subscribe = subscribe
        return pubsub

    client.pubsub = capturing_pubsub  # type: ignore[method-assign]


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_a_dropped_redis_connection_is_resubscribed_without_loss_or_repeat(
        flavour: str, redis_url: str, redis_client: redis.Redis) -> None:
    sync_bus = EventBus(redis_client)
    sync_bus.publish("k1", ev.QUEUED, 0)
    sockets: list[tuple[str, int]] = []

    def drop_then_publish() -> None:
        deadline = time.monotonic() + 5
        while not sockets or not dict(redis_client.pubsub_numsub(keys.channel("k1")))[keys.channel("k1").encode()]:
            assert time.monotonic() < deadline, "the subscriber never subscribed"
            time.sleep(0.02)
        time.sleep(0.1)
        _kill(redis_client, sockets[0])
        for i in range(3):
            sync_bus.publish("k1", ev.ANSWER_DELTA, 1, text=str(i))
        sync_bus.publish("k1", ev.COMPLETED, 1)

    feeder = threading.Thread(target=drop_then_publish)
    feeder.start()
    if flavour == "sync":
        reader_client = redis.Redis.from_url(redis_url)
        _capture_sync_pubsub(reader_client, sockets)
        events = sync_collect(EventBus(reader_client), "k1", timeout=10)
        reader_client.close()
    else:
        async def body(bus: AsyncEventBus) -> list[dict[str, Any]]:
            _capture_async_pubsub(bus.redis, sockets)
            return await collect(bus, "k1", timeout=10)

        events = run(redis_url, body)
    feeder.join()
    assert [e["seq"] for e in events] == [1, 2, 3, 4, 5]


def test_read_log_is_the_same_sync_and_async_past_terminal_events(redis_url: str, redis_client: redis.Redis) -> None:
    sync_bus = EventBus(redis_client)
    sync_bus.publish("p1", ev.QUEUED, 0, run=0)
    sync_bus.publish("p1", ev.FAILED, 1, error={"code": "internal", "message": "x", "retryable": False})
    sync_bus.publish("p1", ev.QUEUED, 1, run=1)
    sync_bus.publish("p1", ev.COMPLETED, 2)

    async def body(bus: AsyncEventBus) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
        return await bus.read_log("p1"), await bus.read_log("p1", after_seq=1), await collect(bus, "p1", timeout=5)

    whole, rest, followed = run(redis_url, body)
    assert whole == sync_bus.read_log("p1") and [e["seq"] for e in whole] == [1, 2, 3, 4]
    assert rest == sync_bus.read_log("p1", after_seq=1) and [e["seq"] for e in rest] == [2, 3, 4]
    assert followed == whole


def test_async_publish_honours_the_seq_floor(redis_url: str, redis_client: redis.Redis) -> None:
    async def body(bus: AsyncEventBus) -> list[int]:
        return [await bus.publish("p2", ev.QUEUED, 0, seq_floor=7), await bus.publish("p2", ev.STARTED, 1)]

    assert run(redis_url, body) == [8, 9]
