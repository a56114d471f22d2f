"""The worker's CPU gate (worker/loop.py): at most its slots of task threads run a gated step at once,
a thread already inside may enter again, and a step that raises gives its slot back."""

from __future__ import annotations

import threading

import pytest

from worker.loop import CpuGate


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
