"""Waiting for a task's result, written once for every client: follow its events until its latest run
ends, then read the row (the worker persists before it publishes, but a replica may lag a moment).

`ResultWait` keeps the bookkeeping (where to follow from, how long is left); `wait_for_result` drives it
for any TaskClient, `await_result` for any AsyncTaskClient.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

from contracts.errors import WaitTimeout
from contracts.store import TaskRecord
from producer.protocol import AsyncTaskClient, TaskClient

SETTLE_S = 5.0  # how long the row may lag behind the terminal event
SETTLE_POLL_S = 0.05


class ResultWait:
    """Where to follow from, and how long is left."""

    def __init__(self, task_id: str, timeout: float | None, record: Any) -> None:
        self.task_id = task_id
        self.timeout = timeout
        self.deadline = None if timeout is None else time.monotonic() + timeout
        # From just before the current run's task.queued (the row remembers its seq): earlier runs are over.
        self.from_seq = max(0, int(getattr(record, "last_seq", 0) or 0) - 1)

    def remaining(self) -> float | None:
        if self.deadline is None:
            return None
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise self.timed_out()
        return left

    def saw(self, event: dict[str, Any]) -> None:
        self.from_seq = max(self.from_seq, int(event["seq"]))

    def settle_deadline(self) -> float:
        """Until when to poll the row for its terminal status after the terminal event came."""
        settle = time.monotonic() + SETTLE_S
        return settle if self.deadline is None else min(self.deadline, settle)

    def timed_out(self) -> WaitTimeout:
        return WaitTimeout(f"task {self.task_id} did not finish within {self.timeout:g} s")


def wait_for_result(client: TaskClient, task_id: str, timeout: float | None = None) -> TaskRecord:
    """Block until the task is terminal (or WaitTimeout) and return its record."""
    record = client.get(task_id)
    wait = ResultWait(task_id, timeout, record)
    while not record.is_terminal:
        try:  # the followers read the row too: they end when it is terminal, event or not
            for event in client.events(task_id, from_seq=wait.from_seq, timeout=wait.remaining()):
                wait.saw(event)
        except TimeoutError:
            raise wait.timed_out() from None
        deadline = wait.settle_deadline()
        while not (record := client.get(task_id)).is_terminal and time.monotonic() < deadline:
            time.sleep(SETTLE_POLL_S)
    return record


async def await_result(client: AsyncTaskClient, task_id: str, timeout: float | None = None) -> TaskRecord:
    """`wait_for_result`, awaited."""
    record = await client.get(task_id)
    wait = ResultWait(task_id, timeout, record)
    while not record.is_terminal:
        try:
            async with contextlib.aclosing(client.events(task_id, from_seq=wait.from_seq,  # type: ignore[type-var]
                                                         timeout=wait.remaining())) as events:
                async for event in events:
                    wait.saw(event)
        except TimeoutError:
            raise wait.timed_out() from None
        deadline = wait.settle_deadline()
        while not (record := await client.get(task_id)).is_terminal and time.monotonic() < deadline:
            await asyncio.sleep(SETTLE_POLL_S)
    return record
