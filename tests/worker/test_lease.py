"""The task lease, on a real Redis: one holder, renewed, recreated after Redis lost it, reported when taken over."""

from __future__ import annotations

import time

import redis

from contracts.keys import lease_key
from worker.recovery.lease import LeaseKeeper


# -- the task lease --------------------------------------------------------------------------------
def test_a_lease_has_one_holder_until_released(redis_client: redis.Redis) -> None:
    first = LeaseKeeper(redis_client, ttl_s=5, owner="w1")
    second = LeaseKeeper(redis_client, ttl_s=5, owner="w2")
    try:
        lease = first.try_acquire("t1")
        assert lease is not None and lease.guarded
        assert second.try_acquire("t1") is None
        assert (second.holder("t1") or "").startswith("w1:")
        second.release(lease.__class__("t1", "not-the-token"))  # someone else's token: no effect
        assert second.try_acquire("t1") is None
        first.release(lease)
        assert second.try_acquire("t1") is not None
    finally:
        first.stop()
        second.stop()


def test_a_lease_is_renewed_recreated_after_a_redis_loss_and_reported_when_taken_over(
    redis_client: redis.Redis,
) -> None:
    keeper = LeaseKeeper(redis_client, ttl_s=0.6, owner="w1").start()
    try:
        lease = keeper.try_acquire("t2")
        assert lease is not None
        time.sleep(1.0)  # longer than the TTL: only renewals keep it
        assert redis_client.get(lease_key("t2")) == lease.token.encode()
        redis_client.delete(lease_key("t2"))  # what a Redis restart without persistence does
        keeper.renew_all()
        assert redis_client.get(lease_key("t2")) == lease.token.encode()

        lost: list[str] = []
        lease.on_lost = lambda: lost.append("lost")
        redis_client.set(lease_key("t2"), "w2:other")  # another delivery took it over
        keeper.renew_all()
        assert lease.lost and lost == ["lost"]
        keeper.release(lease)
        assert redis_client.get(lease_key("t2")) == b"w2:other"  # not ours to delete
    finally:
        keeper.stop()


def test_without_redis_a_lease_is_granted_unguarded() -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    keeper = LeaseKeeper(client, ttl_s=5, owner="w1")
    try:
        lease = keeper.try_acquire("t3")
        assert lease is not None and not lease.guarded
        keeper.renew_all()  # logs and carries on
        assert not lease.lost
    finally:
        keeper.stop()
