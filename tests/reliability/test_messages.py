"""The worker runs what the task row says (design.md, Tenants and access): a queue message names a task
and a run; one that does not match its row is logged loudly, acknowledged and never run. Celery's
states tell the truth: a failed task is a FAILURE; a revoked one is cancelled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import uuid
from typing import Any

import httpx
import pytest
from celery.events.state import State

from contracts import events as ev
from contracts.job import QUEUE, TASK_NAME, parse_job
from contracts.settings import Settings
from producer.local.embedded import free_port
from tests.imagegen import make_image
from tests.producer import ApiServer
from tests.reliability import Stack, terminal_events
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _row_without_message(stack: Stack, images: list[str]) -> str:
    """A queued task row whose message was never sent (the test sends its own)."""
    job = parse_job({"images": images, "prompt": "What colour is this?", "task_id": f"t-{uuid.uuid4().hex[:12]}"})
    stack.client.store.create_task(job)
    return job.task_id


def _send(stack: Stack, task_id: str, body: dict[str, Any]) -> None:
    stack.client.celery.send_task(TASK_NAME, args=[body], task_id=task_id, queue=QUEUE)


def _log_lines(stack: Stack, event: str) -> list[dict[str, Any]]:
    return stack.log_events(event)


def _drained(stack: Stack) -> bool:
    return not stack.redis.llen(QUEUE) and not stack.redis.hlen("unacked")


def test_a_message_that_does_not_match_its_row_is_refused_and_acknowledged(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start_worker(concurrency=4)
    other = stack.tmp / "blue.png"
    other.write_bytes(make_image("PNG", size=(64, 48), color=(20, 20, 220)))
    wrong_run = _row_without_message(stack, [str(stack.image)])
    other_images = _row_without_message(stack, [str(stack.image)])
    no_row = f"t-{uuid.uuid4().hex[:12]}"
    crafted = stack.record(other_images).request | {"images": [f"file://{other}"]}

    _send(stack, wrong_run, {"version": 2, "task_id": wrong_run, "run": 3})
    _send(stack, other_images, crafted)
    _send(stack, no_row, {"version": 2, "task_id": no_row, "run": 0})

    wait_until(lambda: len(_log_lines(stack, "task.message_rejected")) == 3, 20, stack.worker_logs()[-3000:])
    reasons = {entry["task_id"]: entry["reason"] for entry in _log_lines(stack, "task.message_rejected")}
    assert "run 3" in reasons[wrong_run] and "run 0" in reasons[wrong_run]
    assert "differs from the task row" in reasons[other_images]
    assert reasons[no_row] == "no task row"
    assert all(entry["level"] == "error" for entry in _log_lines(stack, "task.message_rejected"))
    wait_until(lambda: _drained(stack), 10, "the refused messages are acknowledged")
    for task_id in (wrong_run, other_images):
        record = stack.record(task_id)
        assert record.status == "queued" and record.attempts == 0  # never run
    assert stack.stats()["streams_started"] == 0
    assert stack.client.store.get(no_row) is None


def test_an_old_format_message_that_matches_its_row_runs(make_stack: Any) -> None:
    """A rolling upgrade: messages queued by the previous producer carry the whole request."""
    stack: Stack = make_stack()
    stack.start_worker(concurrency=2)
    task_id = _row_without_message(stack, [str(stack.image)])
    _send(stack, task_id, stack.record(task_id).request)
    assert stack.wait_terminal([task_id], timeout=30)[task_id].status == "completed"
    assert not _log_lines(stack, "task.message_rejected")


def test_the_producer_sends_only_the_task_and_its_run(make_stack: Any) -> None:
    stack: Stack = make_stack()
    task_id = stack.submit()
    (raw,) = stack.redis.lrange(QUEUE, 0, -1)
    message = json.loads(raw)
    assert message["headers"]["id"] == task_id
    body = json.loads(__import__("base64").b64decode(message["body"]))
    assert body[0] == [{"version": 2, "task_id": task_id, "run": 0}]


def test_a_failed_task_is_a_failure_in_celery_and_is_acknowledged(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start_worker(concurrency=2)
    failed = stack.client.submit(images=[str(stack.tmp / "missing.png")], prompt="Where is it?").task_id
    completed = stack.submit()
    records = stack.wait_terminal([failed, completed], timeout=30)
    assert records[failed].status == "failed" and records[completed].status == "completed"
    wait_until(lambda: bool(_log_lines(stack, "celery.task_failure")), 10, "Celery saw the failure")
    assert [entry["task_id"] for entry in _log_lines(stack, "celery.task_failure")] == [failed]
    assert "TaskUnsuccessful" in _log_lines(stack, "celery.task_failure")[0]["kind"]
    assert "raised unexpected" not in stack.worker_logs()  # an expected outcome, not a crash
    wait_until(lambda: _drained(stack), 10, "both messages are acknowledged")


def test_a_revoked_task_is_cancelled(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start_worker(concurrency=1)
    busy = stack.submit("Keep the only slot busy.", tps=40, reasoning_tokens=80)
    stack.wait_events(busy, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    revoked = stack.submit("Never mind.")
    stack.client.celery.control.revoke(revoked)  # `celery control revoke TASK_ID`
    record = stack.wait_terminal([revoked], timeout=30)[revoked]
    assert record.status == "cancelled" and record.attempts == 0
    (terminal,) = terminal_events(stack.events(revoked))
    assert terminal["type"] == ev.CANCELLED
    assert stack.wait_terminal([busy], timeout=30)[busy].status == "completed"


def test_a_task_revoked_while_it_streams_is_cancelled(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start_worker(concurrency=2)
    task_id = stack.submit("A long one.", tps=20, reasoning_tokens=400)
    stack.wait_events(task_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    stack.client.celery.control.revoke(task_id)  # `celery control revoke TASK_ID`, no --terminate
    record = stack.wait_terminal([task_id], timeout=20)[task_id]
    assert record.status == "cancelled" and record.attempts == 1
    (terminal,) = terminal_events(stack.events(task_id))
    assert terminal["type"] == ev.CANCELLED


class CeleryMonitor:
    """What Flower sees: Celery's events, folded into celery.events.State (Flower's own state), in a thread."""

    def __init__(self, stack: Stack) -> None:
        self.app = stack.client.celery
        self.state = State()
        self.types: list[tuple[str, str]] = []
        self._receiver: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> CeleryMonitor:
        self._thread.start()
        return self

    def listening(self, stack: Stack, warm: list[str]) -> bool:
        """Whether the monitor has seen a whole task yet; submits another when the last one ended unseen
        (the receiver binds its queue some time after it starts)."""
        seen = any(self.task_state(task) == "SUCCESS" for task in warm)
        if not seen and (not warm or stack.record(warm[-1]).is_terminal):
            warm.append(stack.submit())
        return seen

    def __exit__(self, *exc: object) -> None:
        if self._receiver is not None:
            self._receiver.should_stop = True
        self._thread.join(timeout=10)  # a heartbeat (every 2 s) wakes the capture to see should_stop

    def _run(self) -> None:
        def take(event: dict[str, Any]) -> None:
            self.state.event(event)
            self.types.append((event.get("type", ""), event.get("uuid", "")))

        try:
            with self.app.connection() as connection:
                self._receiver = self.app.events.Receiver(connection, handlers={"*": take})
                self._receiver.capture(limit=None, timeout=None, wakeup=True)
        except Exception as exc:  # the broker went away (teardown): the test's waits report what is missing
            self.error = exc

    def task_state(self, task_id: str) -> str:
        task = self.state.tasks.get(task_id)
        return task.state if task is not None else "UNKNOWN"


def test_celery_monitoring_sees_success_failure_with_its_code_revoked_retries_and_sends(make_stack: Any) -> None:
    stack: Stack = make_stack()
    stack.start_worker(concurrency=4)
    with CeleryMonitor(stack) as monitor:
        warm: list[str] = []
        wait_until(lambda: monitor.listening(stack, warm), 90, "the monitor sees a task")
        completed = stack.submit()
        failed = stack.client.submit(images=[str(stack.tmp / "missing.png")], prompt="Where is it?").task_id
        retried = stack.submit("Cut once.", fault="cut:6@1", tps=200)
        cancelled = stack.submit("A long one.", tps=20, reasoning_tokens=400)
        stack.wait_events(cancelled, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
        stack.client.cancel(cancelled)
        stack.wait_terminal([completed, failed, retried, cancelled], timeout=60)
        expected = {completed: "SUCCESS", failed: "FAILURE", retried: "SUCCESS", cancelled: "REVOKED"}
        wait_until(lambda: {t: monitor.task_state(t) for t in expected} == expected, 30,
                   "the monitor's states settle")
        failure = monitor.state.tasks[failed]
        assert "image.not_found" in str(failure.exception)
        assert ("task-retried", retried) in monitor.types
        sent = {task_id for kind, task_id in monitor.types if kind == "task-sent"}
        assert set(expected) <= sent  # the producer announces every task it sends


def test_a_revoke_sent_while_no_worker_is_online_still_cancels_the_task(make_stack: Any) -> None:
    """`celery control revoke ID` with no worker online is a broadcast nobody hears; the API hears it, the
    row becomes cancelled, and the worker that starts later runs nothing for it."""
    stack: Stack = make_stack()
    with ApiServer(Settings.from_env(stack.env)) as api:
        assert api.app.state.revokes.ready.wait(30)
        revoked = stack.submit("Never mind.")
        stack.client.celery.control.revoke(revoked)  # no worker is online
        wait_until(lambda: stack.record(revoked).status == "cancelled", 30, "the API cancels the revoked task")
    stack.start_worker(concurrency=2)
    after = stack.submit()  # queued behind the revoked task's message: once it completes, both were taken
    assert stack.wait_terminal([after], timeout=30)[after].status == "completed"
    record = stack.record(revoked)
    assert record.status == "cancelled" and record.attempts == 0
    assert [e["type"] for e in terminal_events(stack.events(revoked))] == [ev.CANCELLED]


def test_flower_shows_success_failure_with_its_code_and_revoked(make_stack: Any) -> None:
    """Flower itself, as operators run it, against the same broker: the three endings as they are."""
    stack: Stack = make_stack()
    stack.start_worker(concurrency=4)
    port = free_port()
    flower = subprocess.Popen([sys.executable, "-m", "celery", "-A", "worker.celery:app", "flower", f"--port={port}",
                               "--address=127.0.0.1"], env={**os.environ, **stack.env, "FLOWER_UNAUTHENTICATED_API": "true",
                                                             "LOG_LEVEL": "WARNING"},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"

    def states() -> dict[str, Any]:
        try:
            return dict(httpx.get(f"{base}/api/tasks", timeout=5).json())
        except (httpx.HTTPError, ValueError):
            return {}

    try:
        warm: list[str] = []

        def listening() -> bool:  # Flower listens once it has seen a whole task (it binds its queue late)
            if not warm or stack.record(warm[-1]).is_terminal:
                seen = any(states().get(task, {}).get("state") == "SUCCESS" for task in warm)
                if not seen:
                    warm.append(stack.submit())
                return seen
            return False

        wait_until(listening, 90, "Flower sees a task")
        completed = stack.submit()
        failed = stack.client.submit(images=[str(stack.tmp / "missing.png")], prompt="Where is it?").task_id
        cancelled = stack.submit("A long one.", tps=20, reasoning_tokens=400)
        stack.wait_events(cancelled, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
        stack.client.cancel(cancelled)
        stack.wait_terminal([completed, failed, cancelled], timeout=60)
        expected = {completed: "SUCCESS", failed: "FAILURE", cancelled: "REVOKED"}
        wait_until(lambda: {t: states().get(t, {}).get("state") for t in expected} == expected, 30,
                   "Flower's states settle")
        assert "image.not_found" in str(states()[failed].get("exception"))
    finally:
        flower.terminate()
        flower.wait(timeout=10)
