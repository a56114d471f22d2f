"""The worker's event loop (worker/loop.py): a coroutine runs in the caller's context (its log fields and
trace span go with it), its result or exception comes back, and cancelling the future cancels it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections.abc import Iterator

import pytest
import structlog

from worker.loop import WorkerLoop

MARK: contextvars.ContextVar[str] = contextvars.ContextVar("mark", default="none")


@pytest.fixture()
def loop() -> Iterator[WorkerLoop]:
    worker_loop = WorkerLoop(name="test-loop").start()
    yield worker_loop
    worker_loop.stop()


def test_a_coroutine_sees_the_callers_context_and_returns_or_raises(loop: WorkerLoop) -> None:
    async def read() -> tuple[str, object]:
        return MARK.get(), structlog.contextvars.get_contextvars().get("task_id")

    async def boom() -> None:
        raise ValueError("no")

    MARK.set("caller")
    with structlog.contextvars.bound_contextvars(task_id="t-1"):
        assert loop.run(read()) == ("caller", "t-1")
    assert loop.run(read()) == ("caller", None)
    with pytest.raises(ValueError, match="no"):
        loop.run(boom())


def test_cancelling_the_future_cancels_the_coroutine(loop: WorkerLoop) -> None:
    started, stopped = concurrent.futures.Future[None](), concurrent.futures.Future[None]()

    async def forever() -> None:
        started.set_result(None)
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            stopped.set_result(None)
            raise

    future = loop.submit(forever())
    started.result(10)
    assert future.cancel()
    stopped.result(10)
    assert future.cancelled()
