"""The model limiter against a real Redis: many threads and processes hammering one family.

Windows are scaled down (a 100 ms "second", a 6 s "minute": the same 1:60 ratio) so the tests run in
seconds; grants are read back from the limiter's own log (Redis time), not from thread clocks.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest
import redis

from contracts import flow, keys
from contracts.flow import ModelLimit
from tests.waiting import wait_until
from worker.flow.limiter import ModelLimiter

SECOND_MS, MINUTE_MS = 100, 6_000
MODEL = "qvq-max"


def _limiter(client: redis.Redis, rpm: int, tpm: int = 10**9) -> ModelLimiter:
    return ModelLimiter(client, {"qvq-max": ModelLimit(rpm=rpm, tpm=tpm)}, windows_ms=(SECOND_MS, MINUTE_MS))


def _take(limiter: ModelLimiter, tenant: str = "a", tokens: int = 0) -> tuple[str, int]:
    """Wait for a grant; returns (ticket, grant time in Redis ms)."""
    ticket = limiter.wait_for_capacity(MODEL, tenant=tenant, tokens=tokens, should_stop=lambda: False,
                                       on_wait=lambda _: None)
    assert ticket is not None
    score = limiter.client.zscore(keys.requests_key("qvq-max"), ticket)
    assert score is not None
    return ticket, int(score)


def _max_in_window(times: list[int], window_ms: int) -> int:
    times = sorted(times)
    best, start = 0, 0
    for end, moment in enumerate(times):
        while times[start] <= moment - window_ms:
            start += 1
        best = max(best, end - start + 1)
    return best


def _hammer(limiter: ModelLimiter, threads: int, calls: int, **take: Any) -> list[int]:
    times: list[int] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(calls):
            _, moment = _take(limiter, **take)
            with lock:
                times.append(moment)

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert len(times) == threads * calls
    return times


def test_many_threads_never_exceed_the_second_or_the_minute_limit(redis_client: redis.Redis) -> None:
    limiter = _limiter(redis_client, rpm=120)  # 2 per "second", 120 per "minute"
    times = _hammer(limiter, threads=12, calls=13)  # 156 calls: the minute binds after the first 120
    assert _max_in_window(times, SECOND_MS) <= 2
    assert _max_in_window(times, MINUTE_MS) <= 120
    assert max(times) - min(times) >= MINUTE_MS  # the last 36 had to wait for the minute to roll


def _process_hammer(url: str, calls: int, out: Any) -> None:
    client = redis.Redis.from_url(url)
    limiter = _limiter(client, rpm=120)
    out.extend([_take(limiter, tenant="p")[1] for _ in range(calls)])


def test_worker_processes_share_the_limit(redis_url: str, redis_client: redis.Redis) -> None:
    with multiprocessing.Manager() as manager:
        out = manager.list()
        context = multiprocessing.get_context("spawn")
        processes = [context.Process(target=_process_hammer, args=(redis_url, 15, out)) for _ in range(4)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(60)
        times = list(out)
    assert len(times) == 60
    assert _max_in_window(times, SECOND_MS) <= 2


def test_tokens_bind_per_second_and_per_minute(redis_client: redis.Redis) -> None:
    limiter = _limiter(redis_client, rpm=6000, tpm=60_000)  # 1,000 tokens per "second"
    charged: list[tuple[int, int]] = []
    lock = threading.Lock()

    def run() -> None:
        for _ in range(5):
            ticket, moment = _take(limiter, tokens=300)
            limiter.settle(MODEL, ticket, 100)
            with lock:
                charged.append((moment, 300))

    workers = [threading.Thread(target=run) for _ in range(6)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    # input tokens granted in any "second" never exceed its limit (output is charged after the call)
    by_time = sorted(charged)
    for i, (start, _) in enumerate(by_time):
        inside = sum(tokens for moment, tokens in by_time[i:] if moment < start + SECOND_MS)
        assert inside <= 1000


def test_a_call_larger_than_the_token_limit_goes_alone(redis_client: redis.Redis) -> None:
    limiter = _limiter(redis_client, rpm=6000, tpm=6000)  # 100 tokens per "second"
    first, _ = _take(limiter, tokens=500)  # alone in an empty window: admitted, or it never could be
    decision = limiter.acquire(MODEL, limiter.new_ticket(), tenant="a", tokens=10)
    assert not decision.go and decision.wait_s > 0


def test_waiters_of_one_tenant_go_first_come_first_served(redis_client: redis.Redis) -> None:
    limiter = _limiter(redis_client, rpm=60)  # 1 per "second": one head at a time
    _take(limiter)  # fill the window so everyone below queues
    order: list[int] = []
    threads = []
    for index in range(6):
        thread = threading.Thread(target=lambda i=index: (_take(limiter), order.append(i)))
        thread.start()
        threads.append(thread)
        # joined: waiting, or already granted (a grant leaves the queue), whatever the machine's speed
        wait_until(lambda n=index + 1: redis_client.zcard(keys.waiters_key("qvq-max")) + len(order) >= n,
                   poll_s=0.005)
    for thread in threads:
        thread.join(30)
    assert order == list(range(6))


def test_tenants_take_turns_when_waiting_for_quota(redis_client: redis.Redis) -> None:
    limiter = _limiter(redis_client, rpm=60)
    _take(limiter, tenant="a")
    order: list[str] = []
    threads = []

    def queue(tenant: str, count: int) -> int:
        """Start a waiter; returns how many calls were granted before it joined the queue."""
        thread = threading.Thread(target=lambda: (_take(limiter, tenant=tenant), order.append(tenant)))
        thread.start()
        threads.append(thread)
        # joined: waiting, or already granted (a grant leaves the queue), whatever the machine's speed
        wait_until(lambda: redis_client.zcard(keys.waiters_key("qvq-max")) + len(order) >= count, poll_s=0.005)
        return len(order)

    for n in range(1, 9):
        queue("a", n)  # a burst of 8 from tenant a
    granted_before_b = queue("b", 9)  # then one call of tenant b
    for thread in threads:
        thread.join(30)
    assert len(order) == 9 and order.index("b") - granted_before_b <= 1  # behind at most one call of a


def test_a_429_holds_every_worker_back_for_its_retry_after(redis_client: redis.Redis) -> None:
    one, other = _limiter(redis_client, rpm=6000), _limiter(redis.Redis.from_url(_url(redis_client)), rpm=6000)
    one.tighten(MODEL, 0.5)
    decision = other.acquire(MODEL, other.new_ticket(), tenant="a", tokens=0)
    assert not decision.go and 0.3 < decision.wait_s <= 0.5
    other.tighten(MODEL, 0.1)  # a shorter Retry-After never shortens the hold
    assert redis_client.pttl(keys.tightened_key("qvq-max")) > 200
    wait_until(lambda: other.acquire(MODEL, other.new_ticket(), tenant="a", tokens=0).go, timeout=3)


def test_a_dead_waiter_does_not_block_the_queue(redis_client: redis.Redis) -> None:
    limiter = _limiter(redis_client, rpm=60)
    _take(limiter)
    limiter.acquire(MODEL, "00000000000000001-dead", tenant="a", tokens=0)  # asks once, never again
    start = time.monotonic()
    _take(limiter, tenant="b")
    assert time.monotonic() - start < 10


def test_unknown_model_family_is_refused_by_settings() -> None:
    with pytest.raises(ValueError, match="unknown model family"):
        flow.parse_model_limits('{"gpt": {"rpm": 1}}')
    with pytest.raises(ValueError, match="positive integer"):
        flow.parse_model_limits('{"qvq-max": {"rpm": 0}}')


def _url(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"
