"""The worker's group-committed publisher keeps the bus's contract, seq_floor included."""

from __future__ import annotations

import redis

from contracts import events as ev
from contracts.bus import EventBus
from worker.stream.publisher import BatchingEventBus


def test_batched_publish_honours_the_seq_floor(redis_client: redis.Redis) -> None:
    bus = BatchingEventBus(redis_client)
    try:
        assert bus.publish("wp1", ev.STARTED, 1) == 1
        assert bus.publish("wp1", ev.ANSWER_DELTA, 1, seq_floor=20, text="x") == 21
        assert bus.publish("wp1", ev.COMPLETED, 1, seq_floor=2) == 22
    finally:
        bus.close()
    assert [e["seq"] for e in EventBus(redis_client).read_log("wp1")] == [1, 21, 22]
