"""Redis behind Sentinel (real redis-server processes: a primary, a replica, three sentinels): the primary
is killed while tasks stream. The broker, the event bus, the limiter, the leases and the sweep follow the
promoted replica; every task completes once, with one bill, and every follower ends."""

from __future__ import annotations

import contextlib
import threading
from pathlib import Path
from typing import Any

import pytest

from contracts import events as ev
from contracts.settings import Settings
from producer.http_client import HttpClient
from tests.producer import ApiServer
from tests.reliability import Stack, after_last_retry, terminal_events, text_of
from tests.sentinels import SentinelSet

pytestmark = pytest.mark.timeout(240)

TASKS = 6


def test_a_primary_killed_mid_stream_every_task_completes_once_with_one_bill_and_followers_end(
        tmp_path: Path) -> None:
    with SentinelSet() as sentinels, Stack(
            tmp_path, REDIS_URL=sentinels.url, QVQ_FLOW_CONTROL="1", QVQ_FLOW_MARGIN_MS="1000",
            QVQ_LEASE_TTL_S="20", QVQ_TASK_TIMEOUT_S="90", QVQ_VISIBILITY_TIMEOUT_S="180",
            QVQ_STALL_TIMEOUT_S="20") as stack, contextlib.ExitStack() as closing:
        worker = stack.start_worker(concurrency=TASKS + 2)
        ids = [stack.submit(f"Through a failover, number {n}.", tps=30, reasoning_tokens=150, answer_tokens=30)
               for n in range(TASKS)]
        for task_id in ids:  # every one is streaming
            stack.wait_events(task_id, lambda es: any(e["type"] == ev.REASONING_DELTA for e in es), timeout=60)
        api = closing.enter_context(ApiServer(Settings.from_env(stack.env)))  # SSE through the API's fan-out
        http = closing.enter_context(HttpClient(api.url, ""))
        followed: dict[str, list[dict[str, Any]]] = {}
        followers = [threading.Thread(target=lambda t=task_id: followed.__setitem__(
            t, list(stack.client.events(t, timeout=120))), daemon=True) for task_id in ids]
        followers.append(threading.Thread(target=lambda: followed.__setitem__(
            "sse", list(http.events(ids[0], timeout=120))), daemon=True))
        for follower in followers:
            follower.start()

        sentinels.kill_primary()
        sentinels.wait_failover()

        records = stack.wait_terminal(ids, timeout=120)
        for task_id, record in records.items():
            assert record.status == "completed", (record.status, record.error_code, record.error_message)
            assert record.attempts == 1 and record.answer
            assert len(stack.client.store.usage_rows(task_id)) == 1  # one bill
        assert stack.stats()["requests"] == TASKS  # each model call made once

        for follower in followers:  # every follower ends, on the task's end
            follower.join(timeout=60)
            assert not follower.is_alive()
        for name, events in followed.items():
            (end,) = terminal_events(events)
            assert end["type"] == ev.COMPLETED
            final = after_last_retry(events)
            if not any(e["type"] == ev.STREAM_GAP for e in final):  # a live view never passes a hole off
                assert text_of(final, ev.ANSWER_DELTA) == records[ids[0] if name == "sse" else name].answer
        assert len(followed) == TASKS + 1
        finished = worker.log_events("task.finished")
        assert sorted(entry["task_id"] for entry in finished) == sorted(ids)  # once each

        # the same worker and client carry on against the new master
        after = stack.submit("After the failover.")
        assert stack.wait_terminal([after], timeout=60)[after].status == "completed"
