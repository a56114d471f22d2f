"""A batch's events on Redis: seq in order, `done` never going back within a round (two tallies published in
the other order), a new round starting lower, the end published whatever the order; and the follower
replaying the log then ending at the round's batch.completed."""

from __future__ import annotations

import redis

from contracts import events as ev
from contracts.batches.follow import BatchFollow, follow
from contracts.bus import EventBus


def test_progress_never_goes_back_within_a_round_and_the_follower_ends_at_the_end(
        redis_client: redis.Redis) -> None:
    bus = EventBus(redis_client)
    assert bus.publish_batch("b1", ev.BATCH_PROGRESS, round=0, done=5, items=10) == 1
    assert bus.publish_batch("b1", ev.BATCH_PROGRESS, round=0, done=4, items=10) is None  # an older tally
    assert bus.publish_batch("b1", ev.BATCH_PROGRESS, round=0, done=5, items=10) == 2
    assert bus.publish_batch("b1", ev.BATCH_COMPLETED, final=True, round=0, done=10, items=10) == 3
    assert bus.publish_batch("b1", ev.BATCH_PROGRESS, round=1, done=8, items=10) == 4  # a retry's round
    assert bus.publish_batch("b1", ev.BATCH_COMPLETED, final=True, round=1, done=7, items=10) == 5

    logged = bus.read_batch_log("b1")
    assert [(e["seq"], e["type"], e["done"]) for e in logged] == [
        (1, ev.BATCH_PROGRESS, 5), (2, ev.BATCH_PROGRESS, 5), (3, ev.BATCH_COMPLETED, 10),
        (4, ev.BATCH_PROGRESS, 8), (5, ev.BATCH_COMPLETED, 7)]
    first_round = list(follow(redis_client, BatchFollow("b1"), idle=lambda: True, block_s=0.1))
    assert [e["seq"] for e in first_round] == [1, 2, 3]
    second_round = list(follow(redis_client, BatchFollow("b1", round_=1), idle=lambda: True, block_s=0.1))
    assert [e["seq"] for e in second_round] == [1, 2, 3, 4, 5]
    resumed = list(follow(redis_client, BatchFollow("b1", from_seq=3, round_=1), idle=lambda: True, block_s=0.1))
    assert [e["seq"] for e in resumed] == [4, 5]
    assert list(follow(redis_client, BatchFollow("nothing"), idle=lambda: True, block_s=0.1)) == []
