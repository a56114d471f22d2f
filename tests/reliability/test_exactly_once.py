"""The store's exactly-once primitives under real races, on SQLite and PostgreSQL: one terminal claim
and one bill however many writers race; attempts counted without gaps or repeats; one manual retry."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from contracts.job import parse_job
from contracts.store import CANCELLED, COMPLETED, FAILED, Outcome, Store

pytestmark = pytest.mark.timeout(120)
RACERS = 12


def _race(n: int, work: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as exc:  # kept for the assertion message
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


@pytest.fixture()
def store(database_url: str) -> Any:
    store = Store.from_url(database_url)
    yield store
    store.dispose()


def _task(store: Store, task_id: str) -> str:
    job = parse_job({"task_id": task_id, "images": ["file:///x.png"], "prompt": "race", "tenant": "acme"})
    store.create_task(job)
    return task_id


def _completed(attempt: int, n: int) -> Outcome:
    usage = {"prompt_tokens": 100 + n, "completion_tokens": 10, "total_tokens": 110 + n}
    return Outcome(status=COMPLETED, attempt=attempt, reasoning=f"r{n}", answer=f"a{n}", usage=usage,
                   cost={"input": 0.001, "output": 0.002, "total": 0.003, "currency": "CNY"})


def test_racing_terminal_writes_leave_one_result_and_one_bill(store: Store) -> None:
    task_id = _task(store, "race-finish")
    assert store.start_attempt(task_id) == 1

    def finish(i: int) -> bool:  # the winner gets the bill it wrote; the others None
        if i % 3 == 2:  # some racers fail or cancel instead
            return store.finish(task_id, Outcome(status=FAILED if i % 2 else CANCELLED, attempt=1,
                                                 error_code="internal", error_message=f"racer {i}")) is not None
        return store.finish(task_id, _completed(1, i)) is not None

    results = _race(RACERS, finish)
    assert all(isinstance(r, bool) for r in results), results
    assert results.count(True) == 1
    winner = results.index(True)
    record = store.get(task_id)
    assert record is not None and record.is_terminal
    bills = store.usage_rows(task_id)
    if record.status == COMPLETED:
        assert record.answer == f"a{winner}"
        assert len(bills) == 1 and bills[0]["prompt_tokens"] == 100 + winner
    else:
        assert bills == []
    assert store.finish(task_id, _completed(1, 99)) is None and len(store.usage_rows(task_id)) == len(bills)


def test_racing_attempt_starts_count_each_attempt_once(store: Store) -> None:
    task_id = _task(store, "race-attempts")
    results = _race(RACERS, lambda _: store.start_attempt(task_id))
    assert sorted(results) == list(range(1, RACERS + 1)), results
    assert store.get(task_id).attempts == RACERS  # type: ignore[union-attr]


def test_a_terminal_task_never_starts_again(store: Store) -> None:
    task_id = _task(store, "race-terminal")
    start = store.begin_attempt(task_id)
    assert start is not None and (start.number, start.resumed, start.since_retry) == (1, False, 1)
    resumed = store.begin_attempt(task_id)  # a redelivery while it was marked running
    assert resumed is not None and resumed.number == 2 and resumed.resumed
    assert store.finish(task_id, _completed(2, 0))
    assert store.begin_attempt(task_id) is None and store.start_attempt(task_id) is None
    assert store.requeue(task_id) is None  # a completed task is not retried


def test_racing_manual_retries_requeue_once(store: Store) -> None:
    task_id = _task(store, "race-retry")
    store.start_attempt(task_id)
    store.finish(task_id, Outcome(status=FAILED, attempt=1, error_code="model.unavailable", error_message="503"))
    results = _race(RACERS, lambda _: store.requeue(task_id))
    requeued = [r for r in results if r is not None]
    assert len(requeued) == 1, results
    record = store.get(task_id)
    assert record is not None and record.status == "queued" and record.retry_base == 1
    assert record.error_code is None and record.attempts == 1
    start = store.begin_attempt(task_id)
    assert start is not None and start.number == 2 and start.since_retry == 1 and not start.resumed
