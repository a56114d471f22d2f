"""Viewers always reach the end (issue 10): Redis down across a task's end, Redis restarted without
persistence mid-task, a failed task retried and completed, model text that breaks naive line
splitting, a model server that sends no usage. Every follower (sync `Client.events`, async
`AsyncClient.events`/`result`, SSE through the API, `qvq follow`) ends with the right terminal event."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from contracts import events as ev
from contracts import keys
from contracts.settings import Settings
from producer.aio import AsyncClient
from producer.client import Client
from tests.producer import ApiServer, sse_events
from tests.reliability import Stack, after_last_retry, directive, terminal_events, text_of

pytestmark = pytest.mark.timeout(240)


class Followers:
    """Every kind of follower of one task, each in a thread (or a process), started together."""

    def __init__(self, stack: Stack, api: ApiServer, task_id: str, from_seq: int = 0) -> None:
        self.stack, self.api, self.task_id, self.from_seq = stack, api, task_id, from_seq
        self.results: dict[str, Any] = {}
        self.errors: dict[str, BaseException] = {}
        self.threads: list[threading.Thread] = []
        self.cli: subprocess.Popen[str] | None = None

    def start(self) -> Followers:
        self._thread("sync", lambda: list(self.stack.client.events(self.task_id, from_seq=self.from_seq,
                                                                    timeout=120)))
        self._thread("async", lambda: asyncio.run(self._async_events()))
        self._thread("async_result", lambda: asyncio.run(self._async_result()))
        self._thread("sse", self._sse)
        env = {**os.environ, **self.stack.env}
        self.cli = subprocess.Popen([sys.executable, "-m", "producer.cli", "follow", self.task_id, "--json",
                                     "--from-seq", str(self.from_seq)],
                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return self

    def _thread(self, name: str, target: Callable[[], Any]) -> None:
        def run() -> None:
            try:
                self.results[name] = target()
            except BaseException as exc:  # reported by join()
                self.errors[name] = exc

        thread = threading.Thread(target=run, name=f"follower-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    async def _async_events(self) -> list[dict[str, Any]]:
        async with AsyncClient(Settings.from_env(self.stack.env)) as client:
            return [event async for event in client.events(self.task_id, from_seq=self.from_seq, timeout=120)]

    async def _async_result(self) -> Any:
        async with AsyncClient(Settings.from_env(self.stack.env)) as client:
            return await client.result(self.task_id, timeout=120)

    def _sse(self) -> list[dict[str, Any]]:
        url = f"{self.api.url}/v1/tasks/{self.task_id}/events?from_seq={self.from_seq}"
        with httpx.stream("GET", url, timeout=httpx.Timeout(120, connect=10)) as response:
            assert response.status_code == 200, response.read()
            return [frame["data"] for frame in sse_events(response)]

    def wait_subscribed(self, timeout: float = 60) -> None:
        """Until every follower is subscribed to the task's channel (the API's hub counts as one)."""
        channel = keys.channel(self.task_id)
        deadline = time.monotonic() + timeout
        while dict(self.stack.redis.pubsub_numsub(channel))[channel.encode()] < 5:
            assert time.monotonic() < deadline, "the followers did not all subscribe"
            time.sleep(0.02)

    def join(self, timeout: float = 120) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.1, deadline - time.monotonic()))
            assert not thread.is_alive(), f"{thread.name} never ended"
        assert self.cli is not None
        out, err = self.cli.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert not self.errors, self.errors
        self.results["cli"] = [json.loads(line) for line in out.splitlines() if line.strip()]
        self.results["cli_exit"] = self.cli.returncode
        self.results["cli_stderr"] = err
        return self.results


@pytest.fixture()
def viewers_stack(make_stack: Callable[..., Stack]) -> Iterator[tuple[Stack, ApiServer]]:
    stack = make_stack()
    stack.start_worker(concurrency=4)
    with ApiServer(Settings.from_env(stack.env)) as api:
        yield stack, api


#: How long Redis stays down at most: the task's end (~3 s), then the row check (ROW_CHECK_S + ROW_GRACE_S),
#: with a margin for a loaded machine.
OUTAGE_S = 20.0


def _submit_held(stack: Stack, prompt: str, **emulator: Any) -> tuple[str, Callable[[], None]]:
    """A task on a queue of its own that no worker consumes yet, and the call that starts one: followers
    subscribe while it waits, however long that takes on a loaded machine."""
    held = Settings.from_env({**stack.env, "QVQ_QUEUE": "qvq-held"})
    with Client(held) as client:
        task_id = client.submit(images=[str(stack.image)], prompt=f"{prompt} {directive(**emulator)}").task_id
    return task_id, lambda: stack.start_worker(concurrency=2, name="held", QVQ_QUEUE="qvq-held") and None


def _assert_ends_with(results: dict[str, Any], type_: str) -> None:
    for name in ("sync", "async", "sse", "cli"):
        events = results[name]
        assert events and events[-1]["type"] == type_, (name, [e["type"] for e in events][-5:])
        seqs = [e["seq"] for e in events]
        assert seqs == sorted(set(seqs)), (name, seqs)  # strictly increasing
    assert results["async_result"].status == type_.removeprefix("task.")
    assert results["cli_exit"] == (0 if type_ == ev.COMPLETED else 1), results["cli_stderr"]


def test_redis_down_across_the_end_every_follower_ends_from_the_row(
        viewers_stack: tuple[Stack, ApiServer]) -> None:
    stack, api = viewers_stack
    task_id, release = _submit_held(stack, "Finish while Redis is away.", tps=25, reasoning_tokens=50,
                                    answer_tokens=10)
    followers = Followers(stack, api, task_id).start()
    followers.wait_subscribed()
    release()
    stack.wait_events(task_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es))
    stack.redis_server.stop()
    down_at = time.monotonic()
    record = stack.wait_terminal([task_id], timeout=30)[task_id]
    assert record.status == "completed"
    results = None
    try:
        while time.monotonic() - down_at < OUTAGE_S:  # the followers end while Redis is still down
            if all(not t.is_alive() for t in followers.threads) and followers.cli.poll() is not None:
                break
            time.sleep(0.1)
        ended_while_down = time.monotonic() - down_at < OUTAGE_S
        still = [t.name for t in followers.threads if t.is_alive()] + (["cli"] if followers.cli and followers.cli.poll() is None else [])
    finally:
        stack.redis_server.start()
    results = followers.join()
    _assert_ends_with(results, ev.COMPLETED)
    assert ended_while_down, f"still following after {OUTAGE_S:g} s without Redis: {still}"
    for name in ("sync", "async", "sse", "cli"):
        final = results[name][-1]
        assert final["answer"] == record.answer and final["reasoning"] == record.reasoning, name
        assert final.get("from_row") is True, name


def test_redis_restarted_without_persistence_mid_task_every_follower_ends(
        viewers_stack: tuple[Stack, ApiServer]) -> None:
    stack, api = viewers_stack
    task_id, release = _submit_held(stack, "Go on through a Redis restart.", tps=25, reasoning_tokens=80,
                                    answer_tokens=10)
    followers = Followers(stack, api, task_id).start()
    followers.wait_subscribed()
    release()
    stack.wait_events(task_id, lambda es: sum(e["type"] == ev.REASONING_DELTA for e in es) >= 3)
    stack.redis_server.stop()
    time.sleep(0.5)  # an outage, not a synchronisation: Redis stays away this long
    stack.redis_server.start()  # empty: the log and the seq counter are gone
    record = stack.wait_terminal([task_id], timeout=40)[task_id]
    results = followers.join()
    _assert_ends_with(results, ev.COMPLETED if record.status == "completed" else ev.FAILED)
    for name in ("sync", "async", "sse", "cli"):
        final = results[name][-1]
        if record.status == "completed":
            assert final["answer"] == record.answer, name


def test_fail_retry_complete_every_follower_from_seq_0_ends_with_the_completed_run(
        viewers_stack: tuple[Stack, ApiServer]) -> None:
    stack, api = viewers_stack
    task_id = stack.submit("Refused once, then answered.", fault="400@1", tps=40, reasoning_tokens=40)
    assert stack.wait_terminal([task_id], timeout=30)[task_id].status == "failed"
    stack.wait_for_terminal_event(task_id)
    stack.client.retry(task_id)
    followers = Followers(stack, api, task_id).start()  # from seq 0, while the second run is going on
    record = stack.wait_terminal([task_id], timeout=30)[task_id]
    results = followers.join()
    assert record.status == "completed" and record.run == 1
    _assert_ends_with(results, ev.COMPLETED)
    for name in ("sync", "async", "sse", "cli"):
        events = results[name]
        types = [e["type"] for e in events]
        assert types[0] == ev.QUEUED and ev.FAILED in types, name  # the first run was replayed
        queued = [e for e in events if e["type"] == ev.QUEUED]
        assert [e.get("run") for e in queued] == [0, 1], name
        second = events[events.index(queued[1]):]  # a loaded machine may retry the model within the run
        assert text_of(after_last_retry(second), ev.REASONING_DELTA) == record.reasoning, name
    log = stack.events(task_id)
    assert [e["type"] for e in terminal_events(log)] == [ev.FAILED, ev.COMPLETED]
    assert ev.is_terminal(log[-1])  # nothing follows a run's terminal event


EXOTIC = "line\u2028sep para\u2029sep next\u0085line bom\ufeffmid lone\rcr end"


def test_model_text_with_unicode_line_breaks_completes_exact(stack: Stack) -> None:
    task_id = stack.submit(f"Echo this: {EXOTIC}", reasoning_tokens=5, answer_tokens=5)
    record = stack.wait_terminal([task_id], timeout=30)[task_id]
    assert record.status == "completed", (record.error_code, record.error_message)
    assert EXOTIC in record.answer and EXOTIC in record.reasoning
    events = stack.wait_for_terminal_event(task_id)
    assert text_of(events, ev.ANSWER_DELTA) == record.answer
    assert text_of(events, ev.REASONING_DELTA) == record.reasoning
    assert ev.is_terminal(events[-1])


def test_a_server_without_a_usage_chunk_completes_with_estimated_usage(stack: Stack) -> None:
    task_id = stack.submit("No usage for this one.", no_usage=1)
    record = stack.wait_terminal([task_id], timeout=30)[task_id]
    assert record.status == "completed", (record.error_code, record.error_message)
    assert record.attempts == 1
    assert record.usage["estimated"] is True and record.usage["completion_tokens"] > 0
    assert record.usage["prompt_tokens"] > 0 and record.cost["total"] > 0
    final = stack.wait_for_terminal_event(task_id)[-1]
    assert final["type"] == ev.COMPLETED and final["usage"]["estimated"] is True


def test_the_async_client_submits_cancels_retries_and_waits_like_the_sync_one(make_stack: Callable[..., Stack]) -> None:
    stack = make_stack()

    async def main() -> tuple[Any, ...]:
        async with AsyncClient(Settings.from_env(stack.env)) as client:
            handle = await client.submit(images=[str(stack.image)], prompt="Async, cancelled while queued.",
                                         task_id="aio-1")
            again = await client.submit(images=[str(stack.image)], prompt="x", task_id="aio-2",
                                        idempotency_key="k1")
            same = await client.submit(images=[str(stack.image)], prompt="x", task_id="aio-3",
                                       idempotency_key="k1")
            cancelled = await client.cancel(handle.task_id)  # no worker yet: still queued
            cancelled_record = await client.result(handle.task_id, timeout=10)
            from_seq = await client.retry(handle.task_id)
            await asyncio.to_thread(stack.start_worker, 2)
            record = await client.result(handle.task_id, timeout=60)
            events = [e async for e in client.events(handle.task_id, timeout=10)]
            late_cancel = await client.cancel(handle.task_id)
            with pytest.raises(Exception, match="only failed or cancelled"):
                await client.retry(handle.task_id)
            return (handle, again, same, cancelled, cancelled_record, from_seq, record, events, late_cancel)

    handle, again, same, cancelled, cancelled_record, from_seq, record, events, late_cancel = asyncio.run(main())
    assert handle.created and again.created and not same.created and same.task_id == "aio-2"
    assert cancelled and cancelled_record.status == "cancelled"
    assert record.status == "completed" and record.run == 1 and not late_cancel
    types = [e["type"] for e in events]
    assert types[:3] == [ev.QUEUED, ev.CANCELLED, ev.QUEUED] and types[-1] == ev.COMPLETED
    assert events[2]["seq"] == from_seq + 1 and events[2]["run"] == 1 and events[0]["run"] == 0
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert stack.record(handle.task_id).last_seq >= events[2]["seq"]  # the row remembers the run's start
