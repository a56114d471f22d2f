"""Tenant slots and rate, and parked tasks, against a real Redis."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import redis

from contracts import flow, keys
from contracts.flow import TenantLimit
from contracts.job import JobRequest
from contracts.keys import PARKED as PARKED_KEY
from contracts.settings import Settings
from contracts.store import Store
from worker.flow.control import FlowControl
from worker.flow.fairness import TenantGate


def test_a_tenant_never_holds_more_slots_than_its_concurrency(redis_client: redis.Redis) -> None:
    gate = TenantGate(redis_client, {"a": TenantLimit(concurrency=3)}, lease_ttl_s=5)
    holders = [gate.try_slot("a", f"t{i}") for i in range(5)]
    assert sum(h is not None for h in holders) == 3
    assert gate.try_slot("b", "other") == ""  # no limit for b: nothing taken, nothing to give back
    first = next(h for h in holders if h)
    gate.release("a", first)
    assert gate.try_slot("a", "t9") is not None
    gate.stop()


def test_a_dead_workers_slots_come_back_when_its_lease_expires(redis_client: redis.Redis) -> None:
    dead = TenantGate(redis_client, {"a": TenantLimit(concurrency=1)}, lease_ttl_s=1)
    assert dead.try_slot("a", "t1") is not None
    dead.stop()  # its renewer stops, as if the process died
    alive = TenantGate(redis_client, {"a": TenantLimit(concurrency=1)}, lease_ttl_s=1)
    assert alive.try_slot("a", "t2") is None
    deadline = time.monotonic() + 5
    while alive.try_slot("a", "t2") is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    alive.stop()


def test_a_live_workers_slots_are_renewed_past_their_ttl(redis_client: redis.Redis) -> None:
    gate = TenantGate(redis_client, {"a": TenantLimit(concurrency=1)}, lease_ttl_s=1)
    holder = gate.try_slot("a", "t1")
    assert holder is not None
    first_expiry = redis_client.zscore(keys.tenant_slots_key("a"), holder)
    assert first_expiry is not None

    def redis_ms() -> float:
        seconds, micros = redis_client.time()
        return seconds * 1000 + micros / 1000

    deadline = time.monotonic() + 10
    while redis_ms() < first_expiry + 1000:  # wait until the first lease would have long expired
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert gate.try_slot("a", "t2") is None and gate.running("a") == 1
    gate.stop()


def test_tenant_rate_waits_past_its_requests_per_minute(redis_client: redis.Redis) -> None:
    gate = TenantGate(redis_client, {"a": TenantLimit(rpm=2)}, lease_ttl_s=5)
    assert gate.try_rate("a") == 0 and gate.try_rate("a") == 0
    assert 50 < gate.try_rate("a") <= 60
    assert gate.try_rate("b") == 0


def test_a_parked_task_is_put_back_on_the_queue_once(redis_client: redis.Redis, redis_url: str,
                                                      tmp_path: Path) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}",
                                  "QVQ_TENANT_LIMITS": json.dumps({"a": {"concurrency": 1}})})
    store = Store.from_url(settings.database_url)
    movers = [FlowControl(settings, redis.Redis.from_url(redis_url), store) for _ in range(4)]
    job = JobRequest(task_id="p1", model="qvq-max", images=("x.png",), prompt="p", tenant="a")
    events: list[tuple[str, dict[str, Any]]] = []
    with movers[0].admitted(job, {"task_id": "other"}, lambda *a, **k: None) as first:
        assert first
        with movers[1].admitted(job, job.to_payload(), lambda t, **f: events.append((t, f))) as second:
            assert not second  # parked, not run
    assert events == [("task.waiting", {"reason": "tenant_concurrency", "wait_s": 1.0})]
    assert flow.read_waiting(redis_client, "p1")["reason"] == "tenant_concurrency"  # type: ignore[index]
    sent: list[dict[str, Any]] = []
    lock = threading.Lock()

    def send(payload: dict[str, Any]) -> None:
        with lock:
            sent.append(payload)

    deadline = time.monotonic() + 5
    while not sent:
        threads = [threading.Thread(target=m.parking.move_due, args=(send,)) for m in movers]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert [p["task_id"] for p in sent] == ["p1"] and redis_client.zcard(PARKED_KEY) == 0
    for mover in movers:
        mover.stop()
    store.dispose()
