"""Recovery from leases, not from the broker's visibility timeout (worker/sweep.py): a task whose worker
was SIGKILLed resumes elsewhere within the lease TTL + 60 s, a queued task whose message was purged is
queued again, a terminal row whose event log lost its end gets it back; cancel and retry act at once on
an orphan; a SIGTERMed worker hands its streams back after its grace period."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from contracts import events as ev
from contracts import keys
from contracts.job import QUEUE
from contracts.keys import SWEEP_REPAIRED_UNTIL as REPAIRED_UNTIL_KEY
from contracts.settings import Settings
from tests.reliability import SLOW, Stack, terminal_events, text_of
from tests.waiting import seconds_until
from worker.recovery.sweep import REPAIR_SETTLE_S

pytestmark = pytest.mark.timeout(240)

#: The broker's and the lease's defaults (BASE_ENV shortens them for the other tests).
DEFAULT_DELIVERY = {"QVQ_VISIBILITY_TIMEOUT_S": str(Settings().visibility_timeout_s),
                    "QVQ_LEASE_TTL_S": str(Settings().lease_ttl_s)}
LEASE_TTL_S = Settings().lease_ttl_s


def _wait(condition: Any, timeout: float, what: str, stack: Stack | None = None) -> float:
    """Seconds until condition() is true; past the timeout, the worker's log says why."""
    return seconds_until(condition, timeout, what, poll_s=0.05,
                         detail=(lambda: stack.worker_logs()[-3000:]) if stack else None)


def _streaming(stack: Stack, task_id: str) -> bool:
    return any(e["type"] == ev.REASONING_DELTA for e in stack.events(task_id))


def _lease_gone(stack: Stack, task_id: str) -> bool:
    return not stack.redis.exists(keys.lease_key(task_id))


def _sigkill_mid_stream_then_resume(stack: Stack, deadline_s: float) -> float:
    workers = [stack.start_worker(concurrency=4, name=name) for name in ("a", "b")]
    task_id = stack.submit("Think it over, slowly.", tps=40, reasoning_tokens=200)
    _wait(lambda: _streaming(stack, task_id), 20, "the task streams", stack)
    started_before = stack.stats()["streams_started"]
    (started,) = [e for e in stack.events(task_id) if e["type"] == ev.STARTED]
    (running,) = [w for w in workers if w.process and started["worker"].endswith(f":{w.process.pid}")]
    running.kill()
    killed_at = time.monotonic()

    record = stack.wait_terminal([task_id], timeout=deadline_s)[task_id]
    recovered_s = time.monotonic() - killed_at
    assert record.status == "completed" and record.attempts == 2
    assert recovered_s < deadline_s
    events = stack.events(task_id)
    (terminal,) = terminal_events(events)
    assert terminal["attempt"] == 2
    final = [e for e in events if e["attempt"] == 2]
    assert text_of(final, ev.REASONING_DELTA) == record.reasoning
    assert [b["attempt"] for b in stack.client.store.usage_rows(task_id)] == [2]  # one bill
    assert stack.stats()["streams_started"] - started_before == 1
    assert stack.log_events("task.orphan_requeued", task_id=task_id)
    # The dead worker's reserved message is gone: the broker will not deliver it again in two hours.
    _wait(lambda: not stack.redis.hlen("unacked") and not stack.redis.llen(QUEUE), 5, "the broker is empty")
    return recovered_s


def test_a_sigkilled_workers_task_resumes_within_the_lease_ttl_plus_a_minute(make_stack: Any) -> None:
    """Default lease TTL and visibility timeout (7,200 s); only the sweep runs more often than by default."""
    stack: Stack = make_stack(**DEFAULT_DELIVERY, QVQ_TASK_TIMEOUT_S="60", QVQ_SWEEP_INTERVAL_S="1")
    recovered_s = _sigkill_mid_stream_then_resume(stack, LEASE_TTL_S + 60)
    print(f"\nresumed {recovered_s:.1f} s after the SIGKILL (lease TTL {LEASE_TTL_S:g} s)")


@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="every default, the sweep's interval included (QVQ_SLOW=1)")
def test_with_every_default_a_sigkilled_workers_task_resumes_within_the_lease_ttl_plus_a_minute(
        make_stack: Any) -> None:
    stack: Stack = make_stack(**DEFAULT_DELIVERY, QVQ_TASK_TIMEOUT_S="60")
    recovered_s = _sigkill_mid_stream_then_resume(stack, LEASE_TTL_S + 60)
    print(f"\nresumed {recovered_s:.1f} s after the SIGKILL, every setting at its default")


def _orphan(stack: Stack) -> str:
    """A running task whose only worker was SIGKILLed mid-stream and whose lease has expired."""
    worker = stack.start_worker(concurrency=2, name="doomed")
    task_id = stack.submit("Think it over, slowly.", tps=40, reasoning_tokens=200)
    _wait(lambda: _streaming(stack, task_id), 20, "the task streams", stack)
    worker.kill()
    _wait(lambda: _lease_gone(stack, task_id), 10, "the lease expires")
    assert stack.record(task_id).status == "running"
    return task_id


def test_cancel_of_an_orphan_acts_at_once(make_stack: Any) -> None:
    stack: Stack = make_stack()
    task_id = _orphan(stack)
    started = time.monotonic()
    assert stack.client.cancel(task_id) is True
    assert stack.record(task_id).status == "cancelled"
    assert time.monotonic() - started < 2
    (terminal,) = terminal_events(stack.events(task_id))
    assert terminal["type"] == ev.CANCELLED


def test_retry_of_an_orphan_acts_at_once(make_stack: Any) -> None:
    # The retried run streams the orphan's whole slow answer (220 tokens at 40/s, 5.5 s): the stack's 6 s
    # task limit left a loaded machine no room, so this stack's limit is longer.
    stack: Stack = make_stack(QVQ_TASK_TIMEOUT_S="30", QVQ_VISIBILITY_TIMEOUT_S="60")
    task_id = _orphan(stack)
    started = time.monotonic()
    from_seq = stack.client.retry(task_id)
    assert time.monotonic() - started < 2
    record = stack.record(task_id)
    assert record.status == "queued" and record.run == 1
    stack.start_worker(concurrency=2, name="next")
    done = stack.wait_terminal([task_id], timeout=60)[task_id]
    assert done.status == "completed", (done.error_code, done.error_message)
    events = stack.client.bus.read_log(task_id, after_seq=from_seq)
    assert events[0]["type"] == ev.QUEUED and events[-1]["type"] == ev.COMPLETED


def test_a_queued_task_whose_message_was_purged_is_queued_again(make_stack: Any) -> None:
    stack: Stack = make_stack(QVQ_SWEEP_INTERVAL_S="0.5", QVQ_REQUEUE_GRACE_S="1")
    task_id = stack.submit("Anyone there?")
    assert stack.redis.llen(QUEUE) == 1
    stack.redis.delete(QUEUE)  # `celery purge`
    stack.start_worker(concurrency=2)
    record = stack.wait_terminal([task_id], timeout=30)[task_id]
    assert record.status == "completed" and record.attempts == 1
    assert stack.log_events("task.lost_message_requeued")
    assert len(terminal_events(stack.events(task_id))) == 1


def test_a_terminal_row_whose_log_lost_its_end_gets_its_terminal_event(make_stack: Any) -> None:
    """Redis restarted without persistence after the task ended: a viewer never waits forever."""
    stack: Stack = make_stack(QVQ_SWEEP_INTERVAL_S="0.5")
    stack.start_worker(concurrency=2)
    task_id = stack.submit("Remember this.")
    record = stack.wait_terminal([task_id], timeout=30)[task_id]
    stack.wait_for_terminal_event(task_id)
    stack.redis.delete(keys.log_key(task_id))  # what a restart without persistence leaves
    stack.redis.delete(REPAIRED_UNTIL_KEY)
    events = stack.wait_events(task_id, lambda es: any(ev.is_terminal(e) for e in es), timeout=30)
    (terminal,) = terminal_events(events)
    assert terminal["type"] == ev.COMPLETED
    assert terminal["answer"] == record.answer and terminal["reasoning"] == record.reasoning
    repaired_at = time.time()
    # Later rounds (their watermark passes the repair) see the terminal event and publish nothing more.
    _wait(lambda: float(stack.redis.get(REPAIRED_UNTIL_KEY) or 0) > repaired_at - REPAIR_SETTLE_S + 1, 10,
          "more rounds")
    assert len(terminal_events(stack.events(task_id))) == 1
    assert len(stack.log_events("task.terminal_event_repaired")) == 1


def test_a_sigtermed_worker_hands_its_streams_back_after_its_grace(make_stack: Any) -> None:
    """A deploy: SIGTERM, QVQ_SHUTDOWN_GRACE_S for running streams, then they resume elsewhere at once
    (not after the lease TTL, not after the visibility timeout)."""
    stack: Stack = make_stack(**DEFAULT_DELIVERY, QVQ_TASK_TIMEOUT_S="60", QVQ_STALL_TIMEOUT_S="50")
    leaving = stack.start_worker(concurrency=2, name="leaving", QVQ_SHUTDOWN_GRACE_S="1")
    # Attempt 1 stalls after its first chunk, so it is still open whenever the SIGTERM comes (on a loaded
    # machine the second worker may take seconds to start); attempt 2 streams normally.
    task_id = stack.submit("A long one.", tps=40, reasoning_tokens=200, fault="stall@1")
    _wait(lambda: any(e["type"] == ev.IMAGES_READY for e in stack.events(task_id)), 20, "the call starts", stack)
    stack.start_worker(concurrency=2, name="staying")
    assert leaving.process is not None
    os.kill(leaving.process.pid, signal.SIGTERM)
    _wait(lambda: leaving.process is not None and leaving.process.poll() is not None, 20, "the worker exits",
          stack)
    record = stack.wait_terminal([task_id], timeout=LEASE_TTL_S - 5)[task_id]
    assert record.status == "completed" and record.attempts == 2
    (terminal,) = terminal_events(stack.events(task_id))
    assert terminal["attempt"] == 2
    # The ledger keeps every billed attempt: the handed-back one (our count of what streamed before it
    # was closed) and the one that completed.
    bills = stack.client.store.usage_rows(task_id)
    assert [(b["attempt"], b["outcome"]) for b in bills][-1] == (2, "completed")
    assert [b["attempt"] for b in bills] in ([1, 2], [2])  # 1 only if it had streamed anything yet
    assert leaving.log_events("task.handed_back")
