"""`qvq retry` / Client.retry: a failed or cancelled task is queued again as a new attempt with the same
id; its seq continues; the attempt cap counts from the retry; the caller follows from the seq returned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from contracts import events as ev
from contracts.errors import RequestError
from tests.reliability import Stack, terminal_events, text_of

pytestmark = pytest.mark.timeout(120)


def test_a_failed_task_retried_runs_new_attempts_with_a_fresh_attempt_budget(stack: Stack) -> None:
    # Attempts 1-7 fail, 8 succeeds: 4 attempts before the retry, 4 more after it (QVQ_MAX_ATTEMPTS=4).
    plan = ",".join(f"503@{n}" for n in range(1, 8))
    task_id = stack.submit("Fail for a while, then answer.", fault=plan)
    failed = stack.wait_terminal([task_id], timeout=20)[task_id]
    assert failed.status == "failed" and failed.attempts == 4 and failed.error_code == "model.unavailable"
    last_seq = stack.events(task_id)[-1]["seq"]

    from_seq = stack.client.retry(task_id)
    assert from_seq == last_seq  # the new task.queued is the next event
    queued = stack.record(task_id)
    assert queued.status in ("queued", "running", "completed")
    assert queued.error_code is None or queued.status == "completed"

    events = list(stack.client.events(task_id, from_seq=from_seq, timeout=30))
    assert events[0]["type"] == ev.QUEUED and events[0]["seq"] == from_seq + 1 and events[0]["attempt"] == 4
    assert events[1]["type"] == ev.STARTED and events[1]["attempt"] == 5
    assert [e["attempt"] for e in events if e["type"] == ev.RETRYING] == [6, 7, 8]
    assert events[-1]["type"] == ev.COMPLETED and events[-1]["attempt"] == 8

    record = stack.client.result(task_id, timeout=10)
    assert record.status == "completed" and record.attempts == 8 and record.retry_base == 4
    assert record.error_code is None and record.error_message is None
    assert text_of([e for e in events if e["attempt"] == 8], ev.REASONING_DELTA) == record.reasoning
    assert [b["attempt"] for b in stack.client.store.usage_rows(task_id)] == [8]
    all_events = stack.events(task_id)
    assert [e["seq"] for e in all_events] == list(range(1, len(all_events) + 1))
    assert [e["type"] for e in terminal_events(all_events)] == [ev.FAILED, ev.COMPLETED]

    with pytest.raises(RequestError, match="only failed or cancelled"):
        stack.client.retry(task_id)  # completed: nothing to retry


def test_qvq_retry_follow_on_a_cancelled_task(stack: Stack) -> None:
    task_id = stack.submit("Cancel me, then try again.", tps=40, reasoning_tokens=60)
    stack.wait_events(task_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    stack.client.cancel(task_id)
    assert stack.wait_terminal([task_id], timeout=10)[task_id].status == "cancelled"
    last_seq = stack.events(task_id)[-1]["seq"]

    env = {**os.environ, **stack.env}
    done = subprocess.run([sys.executable, "-m", "producer.cli", "retry", task_id, "--follow", "--json"],
                          env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert events[0]["type"] == ev.QUEUED and events[0]["seq"] == last_seq + 1
    assert events[-1]["type"] == ev.COMPLETED
    assert ev.CANCELLED not in [e["type"] for e in events]  # the earlier run's end is not replayed
    record = stack.record(task_id)
    assert record.status == "completed" and record.attempts == 2
    assert record.reasoning == text_of(events, ev.REASONING_DELTA)  # the whole text, not the cancelled part

    again = subprocess.run([sys.executable, "-m", "producer.cli", "retry", task_id], env=env,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 2 and "only failed or cancelled tasks can be retried" in again.stderr
    unknown = subprocess.run([sys.executable, "-m", "producer.cli", "retry", "no-such-task", "--json"], env=env,
                             capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 2 and "no task" in unknown.stderr
