"""SSE viewers by the hundred on one API process: one Redis pub/sub connection fanned out in memory
(producer/fanout.py); every viewer gets every event once and in order; the hub resubscribes after a
Redis restart with nothing lost; channels are released with their last viewer."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contracts import events as ev
from contracts import keys
from contracts.bus import EventBus
from contracts.job import parse_job
from contracts.settings import Settings
from contracts.store import Store
from producer.local.embedded import EmbeddedRedis
from tests.producer import ApiServer
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(300)


def _task(database_url: str) -> str:
    store = Store.from_url(database_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "hi"})
    store.create_task(job)
    store.dispose()
    return job.task_id


async def _read_sse(response: httpx.Response, out: list[tuple[dict[str, Any], float]]) -> None:
    """Events of one SSE response with their arrival time (lines end at LF: the API writes LF only)."""
    data: list[str] = []
    async for line in response.aiter_lines():
        if line.startswith("data:"):
            data.append(line[5:].lstrip(" "))
        elif not line and data:
            event = json.loads("\n".join(data))
            data.clear()
            out.append((event, time.time()))
            if ev.is_terminal(event):
                return


async def _viewers(url: str, count: int, ready: Any, timeout: float = 120) -> list[list[tuple[dict[str, Any], float]]]:
    received: list[list[tuple[dict[str, Any], float]]] = [[] for _ in range(count)]
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout, connect=30)) as client:

        async def one(index: int) -> None:
            async with client.stream("GET", url) as response:
                assert response.status_code == 200, await response.aread()
                await _read_sse(response, received[index])

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.to_thread(ready)
        async with asyncio.timeout(timeout):
            await asyncio.gather(*tasks)
    return received


def _fan_out(count: int, redis_url: str, redis_client: redis.Redis, database_url: str,
             deltas: int = 40) -> list[float]:
    """`count` SSE viewers of one task on one API process; returns each event's added delay (s)."""
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": database_url})
    task_id = _task(database_url)
    bus = EventBus(redis_client)
    bus.publish(task_id, ev.QUEUED, 0, model="qvq-max", image_count=1, run=0)
    with ApiServer(settings) as api:
        hub = api.app.state.services.fanout

        def publish_when_all_are_live() -> None:
            wait_until(lambda: hub.viewers >= count, 120, f"only {hub.viewers} of {count} viewers subscribed")
            assert dict(redis_client.pubsub_numsub(keys.channel(task_id)))[keys.channel(task_id).encode()] == 1
            for i in range(deltas):
                bus.publish(task_id, ev.ANSWER_DELTA, 1, text=f"{i} ")
                time.sleep(0.02)
            bus.publish(task_id, ev.COMPLETED, 1, answer="".join(f"{i} " for i in range(deltas)))

        received = asyncio.run(_viewers(f"{api.url}/v1/tasks/{task_id}/events", count, publish_when_all_are_live))
        wait_until(lambda: hub.channels == 0, 10, "the channel was not released with its last viewer")
    expected = list(range(1, deltas + 3))
    for events in received:
        assert [event["seq"] for event, _at in events] == expected
    return [at - event["ts"] for events in received for event, at in events if event["seq"] > 1]


def _report(count: int, delays: list[float]) -> None:
    delays.sort()
    p50, p99 = statistics.median(delays), delays[int(len(delays) * 0.99) - 1]
    print(f"\n{count} SSE viewers on one API process: {len(delays)} deliveries, added delay "
          f"p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {delays[-1] * 1000:.1f} ms")


def test_500_sse_viewers_on_one_process_get_every_event_once_in_order(
        redis_url: str, redis_client: redis.Redis, sqlite_url: str) -> None:
    _report(500, _fan_out(500, redis_url, redis_client, sqlite_url))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("QVQ_SLOW") != "1", reason="the 2,000-viewer run: QVQ_SLOW=1")
def test_2000_sse_viewers_on_one_process(redis_url: str, redis_client: redis.Redis, sqlite_url: str) -> None:
    _report(2000, _fan_out(2000, redis_url, redis_client, sqlite_url))


@pytest.fixture()
def own_redis() -> Iterator[EmbeddedRedis]:
    with EmbeddedRedis() as server:
        yield server


def test_the_hub_resubscribes_after_a_redis_restart_and_nothing_is_lost(
        own_redis: EmbeddedRedis, tmp_path: Path) -> None:
    database_url = f"sqlite:///{tmp_path / 'q.db'}"
    settings = Settings.from_env({"REDIS_URL": own_redis.url, "DATABASE_URL": database_url})
    task_id = _task(database_url)
    client = redis.Redis.from_url(own_redis.url)
    bus = EventBus(client)
    bus.publish(task_id, ev.QUEUED, 0, run=0)
    count = 20
    with ApiServer(settings) as api:
        hub = api.app.state.services.fanout

        def restart_midway() -> None:
            wait_until(lambda: hub.viewers >= count, 60, "viewers did not subscribe")
            for i in range(3):
                bus.publish(task_id, ev.ANSWER_DELTA, 1, text=str(i))
            wait_until(lambda: all(len(r) >= 4 for r in received_so_far), 20, "the first events did not arrive")
            own_redis.stop()
            own_redis.start()  # empty: the log and the counter are gone
            wait_until(lambda: hub.viewers >= count and hub.resubscriptions >= 1, 30, "viewers did not come back")
            for i in range(3, 6):
                bus.publish(task_id, ev.ANSWER_DELTA, 1, seq_floor=4, text=str(i))
            bus.publish(task_id, ev.COMPLETED, 1, seq_floor=4)

        received_so_far: list[list[Any]] = []

        async def main() -> list[list[tuple[dict[str, Any], float]]]:
            return await _viewers_tracked(f"{api.url}/v1/tasks/{task_id}/events", count, restart_midway,
                                          received_so_far)

        received = asyncio.run(main())
    client.close()
    for events in received:
        assert [event["seq"] for event, _at in events] == list(range(1, 9))
        assert "".join(event.get("text", "") for event, _at in events) == "012345"


async def _viewers_tracked(url: str, count: int, ready: Any, shared: list[list[Any]]) -> list[list[Any]]:
    shared.extend([] for _ in range(count))
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(60, connect=30)) as client:

        async def one(index: int) -> None:
            async with client.stream("GET", url) as response:
                assert response.status_code == 200
                await _read_sse(response, shared[index])

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        await asyncio.to_thread(ready)
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)
    return shared


def test_a_channel_is_subscribed_once_and_released_with_its_last_viewer(
        redis_url: str, redis_client: redis.Redis) -> None:
    from producer.api.fanout import FanoutHub

    bus = EventBus(redis_client)
    bus.publish("fo1", ev.QUEUED, 0)

    def numsub() -> int:
        return int(dict(redis_client.pubsub_numsub(keys.channel("fo1")))[keys.channel("fo1").encode()])

    async def main() -> tuple[int, list[int]]:
        hub = FanoutHub(redis_url)
        try:
            streams = [hub.subscribe("fo1") for _ in range(5)]
            firsts = [await anext(stream) for stream in streams]
            during = await asyncio.to_thread(numsub)
            await asyncio.to_thread(bus.publish, "fo1", ev.COMPLETED, 1)
            seqs = [[e["seq"] async for e in stream] for stream in streams]
            assert all(first["seq"] == 1 for first in firsts) and seqs == [[2]] * 5
            for _ in range(100):
                if await asyncio.to_thread(numsub) == 0:
                    break
                await asyncio.sleep(0.02)
            return during, [await asyncio.to_thread(numsub), hub.channels]
        finally:
            await hub.aclose()

    during, after = asyncio.run(main())
    assert during == 1 and after == [0, 0]



def test_the_viewers_of_a_task_share_one_row_read(redis_url: str) -> None:
    from producer.api.fanout import FanoutHub

    reads: list[str] = []

    async def read(task_id: str) -> str:
        reads.append(task_id)
        await asyncio.sleep(0.05)
        return f"row of {task_id}"

    async def main() -> list[str]:
        hub = FanoutHub(redis_url)
        try:
            shared = hub.row_reader(read)
            return list(await asyncio.gather(*(shared("t1") for _ in range(50)), shared("t2")))
        finally:
            await hub.aclose()

    rows = asyncio.run(main())
    assert rows == ["row of t1"] * 50 + ["row of t2"] and sorted(reads) == ["t1", "t2"]


def test_a_viewer_too_slow_for_its_queue_is_sent_to_the_log_and_misses_nothing(
        redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    from producer.api import fanout

    monkeypatch.setattr(fanout, "QUEUE_SIZE", 4)
    bus = EventBus(redis_client)
    bus.publish("slow1", ev.QUEUED, 0)

    async def main() -> list[int]:
        hub = fanout.FanoutHub(redis_url)
        try:
            stream = hub.subscribe("slow1")
            seqs = [(await anext(stream))["seq"]]
            for i in range(30):  # published while the viewer does not read: its queue overflows
                await asyncio.to_thread(bus.publish, "slow1", ev.ANSWER_DELTA, 1, text=str(i))
            await asyncio.to_thread(bus.publish, "slow1", ev.COMPLETED, 1)
            seqs += [event["seq"] async for event in stream]
            return seqs
        finally:
            await hub.aclose()

    assert asyncio.run(main()) == list(range(1, 33))
