"""Cancellation: a queued task never starts; a running stream stops within a second (the HTTP stream is
closed, so the emulator stops generating), keeps what was received, ends with one task.cancelled."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import Any

import pytest

from contracts import events as ev
from contracts.job import QUEUE
from tests.reliability import Stack, terminal_events, text_of
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def test_a_task_cancelled_while_queued_never_starts(make_stack: Any) -> None:
    stack: Stack = make_stack()
    task_id = stack.submit("Never mind.")
    assert stack.redis.llen(QUEUE) == 1
    assert stack.client.cancel(task_id) is True
    assert stack.record(task_id).status == "cancelled"

    worker = stack.start_worker(concurrency=4)
    wait_until(lambda: worker.log_events("task.skipped", task_id=task_id), 20,  # it took the message, dropped it
               "the worker did not drop the cancelled task's message", detail=lambda: worker.log()[-3000:])
    assert stack.redis.llen(QUEUE) == 0
    events = stack.events(task_id)
    assert [e["type"] for e in events] == [ev.QUEUED, ev.CANCELLED]
    assert stack.stats()["requests"] == 0
    record = stack.record(task_id)
    assert record.status == "cancelled" and record.attempts == 0
    assert stack.client.cancel(task_id) is False  # already finished


def _cancel_when(stack: Stack, task_id: str, ready: Any, *, via_cli: bool = False) -> float:
    stack.wait_events(task_id, ready, timeout=20)
    assert stack.stats()["streams_active"] == 1
    disconnects = stack.stats()["disconnects"]
    start = time.monotonic()
    if via_cli:
        done = subprocess.run([sys.executable, "-m", "producer.cli", "cancel", task_id], env={**os.environ, **stack.env},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0 and "cancel requested" in done.stdout, done.stderr
        start = time.monotonic()  # measure from the moment the command returned
    else:
        assert stack.client.cancel(task_id) is True
    stack.wait_no_active_streams(timeout=3)
    latency = time.monotonic() - start
    assert stack.stats()["disconnects"] == disconnects + 1  # the worker hung up on the emulator
    return latency


def _check_cancelled(stack: Stack, task_id: str) -> tuple[str, str]:
    record = stack.wait_terminal([task_id], timeout=10)[task_id]
    events = stack.wait_for_terminal_event(task_id)
    assert record.status == "cancelled"
    (terminal,) = terminal_events(events)
    assert terminal["type"] == ev.CANCELLED
    # What was persisted is exactly what subscribers saw.
    assert record.reasoning == text_of(events, ev.REASONING_DELTA)
    assert record.answer == text_of(events, ev.ANSWER_DELTA)
    # the service billed the cancelled stream: in the ledger, from our count of what it streamed
    (bill,) = stack.client.store.usage_rows(task_id)
    assert bill["outcome"] == "cancelled" and bill["estimated"] is True
    assert bill["prompt_tokens"] > 0 and bill["completion_tokens"] > 0
    assert stack.client.cancel(task_id) is False
    return record.reasoning or "", record.answer or ""


def test_cancel_mid_reasoning_stops_the_stream_within_a_second(stack: Stack) -> None:
    task_id = stack.submit("Take your time.", tps=40, reasoning_tokens=200, answer_tokens=40)
    latency = _cancel_when(stack, task_id, lambda es: len(text_of(es, ev.REASONING_DELTA)) > 40)
    print(f"\ncancel mid-reasoning: the emulator's stream ended {latency * 1000:.0f} ms after client.cancel()")
    assert latency < 1.0
    reasoning, answer = _check_cancelled(stack, task_id)
    assert reasoning and answer == ""


def test_cancel_mid_answer_with_the_cli_keeps_the_partial_answer(stack: Stack) -> None:
    task_id = stack.submit("Answer slowly.", tps=40, reasoning_tokens=10, answer_tokens=200)
    latency = _cancel_when(stack, task_id, lambda es: len(text_of(es, ev.ANSWER_DELTA)) > 20, via_cli=True)
    assert latency < 1.0
    reasoning, answer = _check_cancelled(stack, task_id)
    assert reasoning and answer and len(answer.split()) < 200
