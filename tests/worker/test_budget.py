"""Budget reservations against a real Redis and each store backend (SQLite, PostgreSQL)."""

from __future__ import annotations

import threading
import time
from decimal import Decimal

import pytest
import redis

from contracts.catalog import cost_decimal, worst_case_cost
from contracts.errors import BudgetError
from contracts.flow import TenantLimit
from contracts.job import JobRequest
from contracts.store import Store
from worker.flow.budget import BudgetKeeper, Reservation

WORST = worst_case_cost("qvq-max", 500)


@pytest.fixture()
def store(database_url: str) -> Store:
    return Store.from_url(database_url)


def _keeper(client: redis.Redis, store: Store, daily: Decimal | None = None, monthly: Decimal | None = None,
            ttl_s: float = 60) -> BudgetKeeper:
    limits = {"t": TenantLimit(daily_budget_cny=daily, monthly_budget_cny=monthly)}
    return BudgetKeeper(client, store, limits, reservation_ttl_s=ttl_s)


def test_fifty_concurrent_reservations_against_a_budget_that_fits_ten(redis_client: redis.Redis, store: Store) -> None:
    keeper = _keeper(redis_client, store, daily=WORST * 10 + WORST / 2)
    granted: list[Reservation] = []
    refused: list[BudgetError] = []
    lock = threading.Lock()
    start = threading.Barrier(50)

    def reserve(index: int) -> None:
        start.wait()
        try:
            reservation = keeper.reserve("t", f"task{index}:1", WORST)
        except BudgetError as error:
            with lock:
                refused.append(error)
            return
        assert reservation is not None
        with lock:
            granted.append(reservation)

    threads = [threading.Thread(target=reserve, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert len(granted) == 10 and len(refused) == 40
    assert all(error.code == "budget.exceeded" and not error.retryable for error in refused)
    assert "daily budget" in refused[0].message


def test_settling_frees_the_difference_and_counts_what_was_spent(redis_client: redis.Redis, store: Store) -> None:
    keeper = _keeper(redis_client, store, daily=WORST * 2 + Decimal("0.05"), monthly=WORST * 100)
    first = keeper.reserve("t", "a:1", WORST)
    second = keeper.reserve("t", "b:1", WORST)
    assert first is not None and second is not None
    with pytest.raises(BudgetError):
        keeper.reserve("t", "c:1", WORST)
    actual = cost_decimal("qvq-max", 500, 200)["total"]
    keeper.settle(first, actual)
    assert keeper.reserve("t", "c:1", WORST) is not None  # the settled call left room
    state = keeper.state("t")
    assert Decimal(state["daily"]["spent"] or 0) == actual
    assert Decimal(state["monthly"]["reserved"] or 0) == WORST * 2


def test_a_dead_workers_reservation_lapses(redis_client: redis.Redis, store: Store) -> None:
    keeper = _keeper(redis_client, store, daily=WORST, ttl_s=0.3)
    assert keeper.reserve("t", "a:1", WORST) is not None  # never settled: its worker died
    with pytest.raises(BudgetError):
        keeper.reserve("t", "b:1", WORST)
    deadline = time.monotonic() + 5
    while True:
        try:
            assert keeper.reserve("t", "b:1", WORST) is not None
            break
        except BudgetError:
            assert time.monotonic() < deadline, "the lapsed reservation was never given back"
            time.sleep(0.05)


def test_spent_money_is_loaded_from_the_ledger_when_redis_has_none(redis_client: redis.Redis, store: Store) -> None:
    job = JobRequest(task_id="old", model="qvq-max", images=("x.png",), prompt="p", tenant="t")
    store.create_task(job)
    store.record_usage("old", 1, model="qvq-max", tenant="t", prompt_tokens=100_000, completion_tokens=20_000,
                       estimated=False, outcome="completed")
    spent = cost_decimal("qvq-max", 100_000, 20_000)["total"]  # 1.44 CNY, recorded before Redis knew
    keeper = _keeper(redis_client, store, daily=spent + WORST - Decimal("0.000001"))
    with pytest.raises(BudgetError, match=f"{spent} spent"):
        keeper.reserve("t", "new:1", WORST)
    assert _keeper(redis_client, store, daily=spent + WORST).reserve("t", "new:1", WORST) is not None


def test_a_tenant_without_a_budget_reserves_nothing(redis_client: redis.Redis, store: Store) -> None:
    assert _keeper(redis_client, store).reserve("t", "a:1", WORST) is None
    assert redis_client.keys("qvq:budget:*") == []
