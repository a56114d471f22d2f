"""The sweep's decisions, one round at a time, on a real Redis and a SQLite store (no worker process)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from contracts import events as ev
from contracts import keys
from contracts.broker import UNACKED as UNACKED_KEY
from contracts.broker import UNACKED_INDEX as UNACKED_INDEX_KEY
from contracts.bus import EventBus
from contracts.job import QUEUE, parse_job
from contracts.keys import SWEEP_LOCK as LOCK_KEY
from contracts.store import COMPLETED, Outcome, Store
from worker.recovery.sweep import Sweep


@pytest.fixture()
def store(tmp_path: Path) -> Iterator[Store]:
    created = Store.from_url(f"sqlite:///{tmp_path / 'qvq.db'}")
    yield created
    created.dispose()


def _sweep(client: redis.Redis, store: Store, sent: list[tuple[str, int]], *, grace_s: float = 0.0,
           queue: str = QUEUE) -> Sweep:
    sweep = Sweep(client, store, EventBus(client, ttl_s=60), lambda task_id, run: sent.append((task_id, run)),
                  interval_s=1, lease_ttl_s=30, requeue_grace_s=grace_s, event_ttl_s=60, queue=queue)
    sweep.confirm_after_s = 0.0  # a second round confirms at once (its wait is a lease renewal period)
    return sweep


def _task(store: Store, *, running: bool) -> str:
    job = parse_job({"images": ["s3://b/k.png"], "prompt": "What is it?"})
    store.create_task(job)
    if running:
        store.begin_attempt(job.task_id)
    return job.task_id


def _kombu_message(task_id: str) -> bytes:
    return json.dumps({"body": "", "headers": {"id": task_id, "task": "qvq.reason"}, "properties": {}}).encode()


def test_a_running_task_without_a_lease_is_requeued_on_the_second_round_only(
        redis_client: redis.Redis, store: Store) -> None:
    sent: list[tuple[str, int]] = []
    sweep = _sweep(redis_client, store, sent)
    orphan, alive = _task(store, running=True), _task(store, running=True)
    redis_client.set(keys.lease_key(alive), "w1:token")
    redis_client.hset(UNACKED_KEY, "tag-1", json.dumps([json.loads(_kombu_message(orphan)), "", QUEUE]))
    redis_client.zadd(UNACKED_INDEX_KEY, {"tag-1": 1.0})

    assert sweep.requeue_orphans() == [] and sent == []  # first sight: a suspect, not yet an orphan
    assert sweep.requeue_orphans() == [orphan]
    assert sent == [(orphan, 0)]
    assert not redis_client.hexists(UNACKED_KEY, "tag-1")  # the dead worker's copy will not come back


def test_a_lease_recreated_between_rounds_clears_the_suspicion(redis_client: redis.Redis, store: Store) -> None:
    """Redis restarted and lost the leases; the live workers' renewals recreate them."""
    sent: list[tuple[str, int]] = []
    sweep = _sweep(redis_client, store, sent)
    task_id = _task(store, running=True)
    sweep.requeue_orphans()
    redis_client.set(keys.lease_key(task_id), "w1:token")
    sweep.requeue_orphans()
    redis_client.delete(keys.lease_key(task_id))
    assert sweep.requeue_orphans() == [] and sent == []  # a new first sight


def test_a_queued_task_is_requeued_only_when_its_message_is_nowhere(redis_client: redis.Redis, store: Store) -> None:
    sent: list[tuple[str, int]] = []
    sweep = _sweep(redis_client, store, sent)
    in_queue, reserved, lost = (_task(store, running=False) for _ in range(3))
    redis_client.lpush(QUEUE, _kombu_message(in_queue))
    redis_client.hset(UNACKED_KEY, "tag-2", json.dumps([json.loads(_kombu_message(reserved)), "", QUEUE]))
    assert sweep.requeue_lost_messages() == []
    assert sweep.requeue_lost_messages() == [lost]
    assert sent == [(lost, 0)]


def test_the_sweep_looks_in_the_configured_queue(redis_client: redis.Redis, store: Store) -> None:
    """With QVQ_QUEUE=custom, a message waiting in "custom" is not lost (nothing is sent twice)."""
    sent: list[tuple[str, int]] = []
    sweep = _sweep(redis_client, store, sent, queue="custom")
    waiting, lost = (_task(store, running=False) for _ in range(2))
    redis_client.lpush("custom", _kombu_message(waiting))
    assert sweep.requeue_lost_messages() == []
    assert sweep.requeue_lost_messages() == [lost]
    assert sent == [(lost, 0)]


def test_with_a_broker_of_its_own_the_sweep_reads_the_queue_there(redis_client: redis.Redis, store: Store) -> None:
    """CELERY_BROKER_URL on another Redis database than REDIS_URL: the queue and kombu's unacked hash are
    read from the broker, so a waiting or reserved message is never taken for lost and sent again."""
    url = redis_client.connection_pool.connection_kwargs
    broker = redis.Redis(host=url.get("host", "127.0.0.1"), port=url.get("port", 6379), password=url.get("password"),
                         db=(int(url.get("db") or 0) + 1) % 16)
    sent: list[tuple[str, int]] = []
    sweep = Sweep(redis_client, store, EventBus(redis_client, ttl_s=60), lambda task_id, run: sent.append((task_id, run)),
                  interval_s=1, lease_ttl_s=30, requeue_grace_s=0, event_ttl_s=60, broker_client=broker)
    sweep.confirm_after_s = 0.0
    queue_key = f"{QUEUE}"
    in_queue, reserved, lost = (_task(store, running=False) for _ in range(3))
    tag = f"tag-{reserved}"
    try:
        broker.lpush(queue_key, _kombu_message(in_queue))
        broker.hset(UNACKED_KEY, tag, json.dumps([json.loads(_kombu_message(reserved)), "", QUEUE]))
        assert sweep.requeue_lost_messages() == []
        assert sweep.requeue_lost_messages() == [lost]
        assert sent == [(lost, 0)] and redis_client.llen(QUEUE) == 0
    finally:
        broker.lrem(queue_key, 0, _kombu_message(in_queue))
        broker.hdel(UNACKED_KEY, tag)
        broker.close()


def test_a_queued_task_within_its_grace_period_is_left_alone(redis_client: redis.Redis, store: Store) -> None:
    sent: list[tuple[str, int]] = []
    sweep = _sweep(redis_client, store, sent, grace_s=3600)
    _task(store, running=False)
    sweep.requeue_lost_messages()
    assert sweep.requeue_lost_messages() == [] and sent == []


def test_a_terminal_row_without_its_terminal_event_gets_it_once(
        redis_client: redis.Redis, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import worker.recovery.sweep as sweep_module

    monkeypatch.setattr(sweep_module, "REPAIR_SETTLE_S", -60.0)  # count the task that just ended
    sent: list[tuple[str, int]] = []
    sweep = _sweep(redis_client, store, sent)
    task_id = _task(store, running=True)
    store.finish(task_id, Outcome(status=COMPLETED, attempt=1, reasoning="hm", answer="42"))
    assert sweep.repair_logs() == [task_id]
    (event,) = EventBus(redis_client, ttl_s=60).read_log(task_id)
    assert event["type"] == ev.COMPLETED and event["answer"] == "42" and event["attempt"] == 1
    redis_client.delete("qvq:sweep:repaired_until")
    assert sweep.repair_logs() == []  # the log ends with it now


def test_one_process_wins_a_round(redis_client: redis.Redis, store: Store) -> None:
    sweeps = [_sweep(redis_client, store, []) for _ in range(3)]
    assert [s._win_round() for s in sweeps] == [True, False, False]
    assert 0 < redis_client.pttl(LOCK_KEY) <= 800
