"""The worker's group-committed publisher (on its event loop) keeps the bus's contract: seq_floor,
order across threads and the loop, one pipeline for what is queued together, a lost script cache."""

from __future__ import annotations

import asyncio

import redis
import redis.asyncio as aioredis

from contracts import events as ev
from contracts.bus import EventBus
from worker.loop import WorkerLoop
from worker.stream.publisher import LoopEventBus


def _bus(redis_client: redis.Redis, redis_url: str) -> tuple[LoopEventBus, WorkerLoop]:
    loop = WorkerLoop().start()
    return LoopEventBus(redis_client, aioredis.Redis.from_url(redis_url), loop), loop


def test_batched_publish_honours_the_seq_floor(redis_client: redis.Redis, redis_url: str) -> None:
    bus, loop = _bus(redis_client, redis_url)
    try:
        assert bus.publish("wp1", ev.STARTED, 1) == 1
        assert bus.publish("wp1", ev.ANSWER_DELTA, 1, seq_floor=20, text="x") == 21
        assert bus.publish("wp1", ev.COMPLETED, 1, seq_floor=2) == 22
    finally:
        loop.stop()
    assert [e["seq"] for e in EventBus(redis_client).read_log("wp1")] == [1, 21, 22]


def test_events_queued_in_one_loop_turn_go_in_one_pipeline_in_order(redis_client: redis.Redis,
                                                                    redis_url: str) -> None:
    bus, loop = _bus(redis_client, redis_url)

    async def burst() -> list[int]:
        futures = [bus.publish_soon("wp2", ev.ANSWER_DELTA, 1, text=str(i)) for i in range(300)]
        return list(await asyncio.gather(*futures))

    try:
        assert loop.run(burst()) == list(range(1, 301))
        assert bus.batches <= 3  # the first event goes alone, the rest wait for it and go together
        redis_client.script_flush()  # Redis lost its scripts (a restart): loaded again, nothing lost
        assert bus.publish("wp2", ev.COMPLETED, 1) == 301
    finally:
        loop.stop()
    assert [e["text"] for e in EventBus(redis_client).read_log("wp2") if e["type"] == ev.ANSWER_DELTA] == [
        str(i) for i in range(300)]
