"""Delivery guarantees on the Redis broker: a second delivery of a running task runs nothing; a task
whose worker was killed resumes as a new attempt on another worker (chaos); a long task does not hold
short ones back (prefetch 1); a worker refuses to start with settings that break this."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from contracts import events as ev
from contracts.job import QUEUE, TASK_NAME
from tests.reliability import SLOW, Stack, terminal_events, text_of
from tests.services import REPO
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(180)


def test_a_second_delivery_of_a_running_task_runs_nothing(stack: Stack) -> None:
    """What the broker does when a task outlives the visibility timeout, done by hand: the same
    message again while the task streams. The lease holds it back; once the task ends it is dropped."""
    started_before = stack.stats()["streams_started"]
    task_id = stack.submit("Stream for a while.", tps=40, reasoning_tokens=100)
    stack.wait_events(task_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    record = stack.record(task_id)
    stack.client.celery.send_task(TASK_NAME, args=[record.request], task_id=task_id, queue=QUEUE)

    stack.wait_terminal([task_id], timeout=20)
    wait_until(lambda: stack.log_events("task.duplicate_delivery_dropped", task_id=task_id), 10,
               "the second delivery was not dropped", detail=lambda: stack.worker_logs()[-3000:])
    assert stack.log_events("task.duplicate_delivery_waiting", task_id=task_id)

    events = stack.events(task_id)
    assert [e["type"] for e in events].count(ev.STARTED) == 1
    (terminal,) = terminal_events(events)
    assert terminal["type"] == ev.COMPLETED
    assert stack.record(task_id).attempts == 1
    assert len(stack.client.store.usage_rows(task_id)) == 1
    assert stack.stats()["streams_started"] - started_before == 1
    assert stack.redis.llen(QUEUE) == 0 and stack.redis.hlen("unacked") == 0


def test_a_long_task_does_not_hold_short_ones_back(make_stack: Any) -> None:
    """acks_late + prefetch multiplier 1: the worker busy with a long stream reserves nothing more,
    so the short tasks go to the idle worker instead of waiting behind the long one."""
    stack: Stack = make_stack()
    stack.start_worker(concurrency=1, name="a")
    stack.start_worker(concurrency=1, name="b")
    long_id = stack.submit("A long one.", tps=40, reasoning_tokens=160)
    stack.wait_events(long_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    short_ids = [stack.submit(f"A short one, number {n}.") for n in range(3)]
    shorts = stack.wait_terminal(short_ids, timeout=20)
    assert stack.record(long_id).status == "running"  # all three done while the long one still streams
    assert all(r.status == "completed" for r in shorts.values())
    assert stack.wait_terminal([long_id], timeout=20)[long_id].status == "completed"


BAD_APP = """
from worker.celery import app

app.conf.broker_transport_options = {**app.conf.broker_transport_options, "visibility_timeout": 60}
app.conf.worker_prefetch_multiplier = 4
"""


def test_the_worker_refuses_to_start_when_the_broker_settings_disagree(stack: Stack, tmp_path: Path) -> None:
    (tmp_path / "badapp.py").write_text(textwrap.dedent(BAD_APP))
    env = {**os.environ, **stack.env, "PYTHONPATH": f"{tmp_path}:{REPO}", "LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-m", "celery", "-A", "badapp", "worker", "-P", "threads", "-c", "2",
                           "--without-gossip", "--without-mingle", "--without-heartbeat"],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output[-3000:]
    assert "refused to start" in output
    assert "visibility_timeout (60) differs from QVQ_VISIBILITY_TIMEOUT_S (12)" in output
    assert "worker_prefetch_multiplier is 4" in output
    assert "worker.ready" not in output


@pytest.mark.slow
def test_chaos_sigkill_the_worker_mid_stream_nothing_lost_nothing_doubled(make_stack: Any) -> None:
    """Workers SIGKILLed at random moments while tasks stream; a new one is started each time. Every
    task reaches exactly one terminal event, one result and one bill; a resumed task's final attempt
    carries exactly the persisted text. Default: 10 tasks, 1 kill; QVQ_SLOW=1: 20 tasks, 3 kills."""
    tasks, kills = (20, 3) if SLOW else (10, 1)
    rng = random.Random(int(os.environ.get("QVQ_CHAOS_SEED", time.time_ns())))
    stack: Stack = make_stack(QVQ_VISIBILITY_TIMEOUT_S="8", QVQ_TASK_TIMEOUT_S="7", QVQ_LEASE_TTL_S="1.5",
                              QVQ_MAX_ATTEMPTS="6", QVQ_STALL_TIMEOUT_S="3")
    concurrency = tasks * 2 // 3  # some tasks stream, some wait in the queue when the kill comes
    worker = stack.start_worker(concurrency=concurrency, name="chaos0")
    ids = [stack.submit(f"Chaos task number {n}.", tps=40, reasoning_tokens=80) for n in range(tasks)]
    started = time.monotonic()

    killed_mid_stream: set[str] = set()
    for cycle in range(kills):
        # Wait until something streams on this worker, then kill it at a random moment.
        deadline = time.monotonic() + 30
        while not _streaming(stack, ids, worker):
            assert time.monotonic() < deadline, f"nothing streams on the worker of cycle {cycle}"
            time.sleep(0.05)
        time.sleep(rng.uniform(0.3, 1.5))
        killed_mid_stream |= _streaming(stack, ids, worker)
        worker.kill()
        worker = stack.start_worker(concurrency=concurrency, name=f"chaos{cycle + 1}")

    records = stack.wait_terminal(ids, timeout=90)
    elapsed = time.monotonic() - started
    lost = [i for i in ids if i not in records]
    doubled = [i for i in ids if len(terminal_events(stack.events(i))) != 1
               or len(stack.client.store.usage_rows(i)) > 1]
    resumed = [i for i in ids if records[i].attempts > 1]
    print(f"\nchaos: {tasks} tasks, {kills} kill(s), {len(killed_mid_stream)} streams cut by kills, "
          f"{len(resumed)} resumed, lost {len(lost)}, duplicates {len(doubled)}, {elapsed:.1f} s")
    assert not lost and not doubled
    assert killed_mid_stream and resumed

    for task_id in ids:
        record, events = records[task_id], stack.events(task_id)
        assert record.status == "completed", (task_id, record.error_code, record.error_message)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert len(stack.client.store.usage_rows(task_id)) == 1
        assert stack.client.store.usage_rows(task_id)[0]["attempt"] == record.attempts
        final = [e for e in events if e["attempt"] == record.attempts]
        assert final[0]["type"] == ev.STARTED  # a resumed attempt begins with task.started
        assert text_of(final, ev.REASONING_DELTA) == record.reasoning
        assert text_of(final, ev.ANSWER_DELTA) == record.answer
        (terminal,) = terminal_events(events)
        assert terminal["reasoning"] == record.reasoning and terminal["attempt"] == record.attempts
    for task_id in killed_mid_stream:
        assert records[task_id].attempts > 1
        assert [e["attempt"] for e in stack.events(task_id) if e["type"] == ev.STARTED] == \
            list(range(1, records[task_id].attempts + 1))

    assert stack.client.store.list_tasks(status="running") == []
    stack.wait_no_active_streams(timeout=3)
    deadline = time.monotonic() + 5
    while stack.redis.llen(QUEUE) or stack.redis.hlen("unacked"):  # the last acks land just after the writes
        assert time.monotonic() < deadline, (stack.redis.llen(QUEUE), stack.redis.hlen("unacked"))
        time.sleep(0.05)


def _streaming(stack: Stack, ids: list[str], worker: Any) -> set[str]:
    """Tasks that this worker process runs and that have published text, with no terminal event yet."""
    out = set()
    suffix = f":{worker.process.pid}"
    for task_id in ids:
        events = stack.events(task_id)
        if not events or ev.is_terminal(events[-1]):
            continue
        starts = [i for i, e in enumerate(events) if e["type"] == ev.STARTED]
        if starts and events[starts[-1]]["worker"].endswith(suffix) and \
                any(e["type"] in ev.DELTA_TYPES for e in events[starts[-1]:]):
            out.add(task_id)
    return out
