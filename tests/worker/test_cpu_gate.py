"""The worker's CPU gate (worker/loop.py): at most its slots of task threads run a gated step at once,
a thread already inside may enter again, a step that raises gives its slot back, a step starts after the
loop has caught up (the loop itself never waits), and a wait inside a step (the database, the loop)
frees the slot."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from unittest.mock import patch

import pytest
import sqlalchemy as sa

from worker.loop import CpuGate, WorkerLoop, cpu_gate
from worker.persist import free_gate_on_queries


def test_at_most_its_slots_run_at_once_and_a_thread_inside_may_enter_again() -> None:
    gate = CpuGate(2)
    inside, most = [0], [0]
    lock = threading.Lock()
    release = threading.Event()
    entered = threading.Semaphore(0)

    @gate.gated
    def nested() -> int:
        return 1

    @gate.gated
    def step() -> int:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        entered.release()
        release.wait(10)
        value = nested()  # re-entered: no second slot taken (this would deadlock with both slots held)
        with lock:
            inside[0] -= 1
        return value

    results: list[int] = []
    threads = [threading.Thread(target=lambda: results.append(step())) for _ in range(5)]
    for thread in threads:
        thread.start()
    assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
    assert not entered.acquire(timeout=0.2)  # the third waits for a slot
    release.set()
    for thread in threads:
        thread.join(10)
    assert results == [1] * 5 and most[0] == 2


def test_a_step_that_raises_gives_its_slot_back() -> None:
    gate = CpuGate(1)

    @gate.gated
    def boom() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError):
        boom()
    done = threading.Event()
    threading.Thread(target=lambda: gate.gated(done.set)()).start()
    assert done.wait(5)


def test_a_step_starts_only_after_the_loop_has_run_what_was_ready() -> None:
    loop = WorkerLoop(name="gate-test").start()
    gate = CpuGate(1)
    gate.defer_to(loop.loop)
    hold, loop_done, entered = threading.Event(), threading.Event(), threading.Event()
    order: list[str] = []

    def busy_loop() -> None:  # a long callback on the loop: a step must not start before it is done
        hold.wait(10)
        order.append("loop")
        loop_done.set()

    try:
        loop.loop.call_soon_threadsafe(busy_loop)
        step = threading.Thread(target=gate.gated(lambda: (order.append("step"), entered.set())))
        step.start()
        assert not entered.wait(0.3)  # the loop is busy: the step waits
        hold.set()
        assert entered.wait(10) and loop_done.is_set()
        step.join(10)
        assert order == ["loop", "step"]
    finally:
        hold.set()
        loop.stop()


def test_the_loop_thread_never_waits_on_the_gate() -> None:
    loop = WorkerLoop(name="gate-test").start()
    gate = CpuGate(1)
    gate.defer_to(loop.loop)
    inside, release = threading.Event(), threading.Event()

    def hold_the_slot() -> None:
        inside.set()
        release.wait(10)

    holder = threading.Thread(target=gate.gated(hold_the_slot))
    holder.start()
    try:
        assert inside.wait(10)

        async def gated_on_the_loop() -> str:
            return gate.gated(lambda: "ran")()

        assert loop.submit(gated_on_the_loop()).result(5) == "ran"  # the slot is held, the loop goes on
    finally:
        release.set()
        holder.join(10)
        loop.stop()


def test_a_wait_inside_a_step_frees_the_slot_for_another_step() -> None:
    gate = CpuGate(1)
    waiting, other_ran, resume = threading.Event(), threading.Event(), threading.Event()

    @gate.gated
    def step_that_waits() -> str:
        with gate.waiting():
            waiting.set()
            resume.wait(10)
        return "resumed"

    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(step_that_waits()))
    first.start()
    assert waiting.wait(10)
    second = threading.Thread(target=gate.gated(other_ran.set))
    second.start()
    assert other_ran.wait(10)  # ran while the first step waited
    resume.set()
    first.join(10)
    second.join(10)
    assert results == ["resumed"]


def test_a_database_round_trip_frees_the_slot(tmp_path: Any) -> None:
    """free_gate_on_queries: while one step's statement runs in the database, another step runs."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'gate.db'}")
    in_query, release, other_ran = threading.Event(), threading.Event(), threading.Event()

    def slow(value: int) -> int:  # a statement that takes as long as the test says
        in_query.set()
        release.wait(10)
        return value

    sa.event.listen(engine, "connect", lambda conn, _: conn.create_function("slow", 1, slow))
    free_gate_on_queries(engine)

    @cpu_gate.gated
    def query() -> int:
        with engine.connect() as conn:
            return int(conn.execute(sa.text("SELECT slow(7)")).scalar_one())

    results: list[int] = []
    first = threading.Thread(target=lambda: results.append(query()))
    first.start()
    try:
        assert in_query.wait(10)
        second = threading.Thread(target=cpu_gate.gated(other_ran.set))
        second.start()
        assert other_ran.wait(10)  # the gate's one slot was free while the statement ran
        second.join(10)
    finally:
        release.set()
        first.join(10)
        engine.dispose()
    assert results == [7]


def test_waiting_for_the_loop_frees_the_slot() -> None:
    loop = WorkerLoop(name="gate-test").start()
    gate = CpuGate(1)
    started, release, other_ran = threading.Event(), threading.Event(), threading.Event()

    async def long_wait() -> str:
        started.set()
        while not release.is_set():
            await asyncio.sleep(0.01)
        return "done"

    results: list[str] = []
    first = threading.Thread(target=lambda: results.append(gate.gated(lambda: loop.run(long_wait()))()))
    try:
        with patch("worker.loop.cpu_gate", gate):
            first.start()
            assert started.wait(10)
            second = threading.Thread(target=gate.gated(other_ran.set))
            second.start()
            assert other_ran.wait(10)
            second.join(10)
            release.set()
            first.join(10)
    finally:
        release.set()
        loop.stop()
    assert results == ["done"]


def test_a_retry_wait_inside_a_step_frees_the_slot() -> None:
    gate = CpuGate(1)
    sleeping, other_ran, wake = threading.Event(), threading.Event(), threading.Event()

    def fake_sleep(seconds: float) -> None:  # contracts.retry.sleep, which every policy's wait calls
        sleeping.set()
        wake.wait(10)

    with patch("contracts.retry.sleep", fake_sleep):
        first = threading.Thread(target=gate.gated(lambda: gate.sleep(5)))
        first.start()
        assert sleeping.wait(10)
        second = threading.Thread(target=gate.gated(other_ran.set))
        second.start()
        assert other_ran.wait(10)
        wake.set()
        first.join(10)
        second.join(10)


def test_more_steps_than_the_pool_has_connections_never_deadlock(tmp_path: Any) -> None:
    """A step holding the slot may wait for a connection; the admission bound keeps one free for it
    (unbounded, the steps waiting to go on hold every connection and the pool times out)."""
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'pool.db'}", pool_size=3, max_overflow=0, pool_timeout=3)
    sa.event.listen(engine, "connect", lambda conn, _: conn.create_function("slow", 1, _slow))
    gate = CpuGate(1, admitted=2)
    free_gate_on_queries(engine, gate)

    @gate.gated
    def step(i: int) -> int:
        with engine.connect() as conn:
            first = int(conn.execute(sa.text("SELECT slow(:i)"), {"i": i}).scalar_one())
            return first + int(conn.execute(sa.text("SELECT slow(1)")).scalar_one())

    try:
        with ThreadPoolExecutor(12) as pool:
            assert sorted(pool.map(step, range(12))) == [i + 1 for i in range(12)]
    finally:
        engine.dispose()


def _slow(value: int) -> int:
    time.sleep(0.02)
    return value


def test_a_commit_frees_the_slot(tmp_path: Any) -> None:
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'commit.db'}")
    committing, release, other_ran = threading.Event(), threading.Event(), threading.Event()
    commit = engine.dialect.do_commit

    def slow_commit(dbapi_connection: Any) -> None:  # a COMMIT that takes as long as the test says
        committing.set()
        release.wait(10)
        commit(dbapi_connection)

    engine.dialect.do_commit = slow_commit  # type: ignore[method-assign]
    gate = CpuGate(1)
    free_gate_on_queries(engine, gate)

    @gate.gated
    def write() -> None:
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS t (x INTEGER)"))

    first = threading.Thread(target=write)
    first.start()
    try:
        assert committing.wait(10)
        second = threading.Thread(target=gate.gated(other_ran.set))
        second.start()
        assert other_ran.wait(10)  # ran while the first step's COMMIT waited
        second.join(10)
    finally:
        release.set()
        first.join(10)
        engine.dispose()
