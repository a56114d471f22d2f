"""Reliability: retries, delivery guarantees, exactly-once results and bills, cancellation, outages,
manual retry, chaos and soak, on real worker processes, a real Redis and the emulator over HTTP.

`Stack` is one isolated set of services for a test or a module: its own Redis server (so workers of
other tests never see its queue, and a test may stop and restart it), its own emulator (so its
counters only count this stack's streams), a SQLite file, worker processes and a producer client.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis

from contracts import events as ev
from contracts.redis_clients import sync_client
from contracts.settings import Settings
from contracts.store import TERMINAL, TaskRecord
from emulator.config import EmulatorConfig
from emulator.server import EmulatorServer
from producer.client import Client
from producer.local.embedded import EmbeddedRedis
from tests.imagegen import make_image
from tests.services import WorkerProcess
from tests.waiting import seconds_until, wait_until

SLOW = os.environ.get("QVQ_SLOW") == "1"
LOG_SETTLE_S = 5.0  # how long a terminal row may wait for its terminal event in the log

BASE_ENV = {
    "QVQ_ALLOW_LOCAL_FILES": "1",
    "QVQ_ALLOW_PRIVATE_URLS": "1",
    "QVQ_COALESCE_MS": "20",
    "QVQ_RETRY_BASE_S": "0.05",
    "QVQ_RETRY_MAX_S": "1",
    "QVQ_STALL_TIMEOUT_S": "1",
    "QVQ_TASK_TIMEOUT_S": "6",
    "QVQ_VISIBILITY_TIMEOUT_S": "12",
    "QVQ_LEASE_TTL_S": "3",
}


def directive(**values: Any) -> str:
    """An emulator directive for the prompt: directive(fault="429@1", tps=40)."""
    return "[[emulator: " + " ".join(f"{k}={v}" for k, v in values.items()) + "]]"


class Stack:
    def __init__(self, tmp: Path, **env: str) -> None:
        self.tmp = tmp
        self.tmp.mkdir(parents=True, exist_ok=True)
        # its own Redis server, unless the test brings one (REDIS_URL: e.g. a Sentinel set)
        self.redis_server = None if "REDIS_URL" in env else EmbeddedRedis().start()
        redis_url = env.get("REDIS_URL") or self.redis_server.url
        self.emulator = EmulatorServer(EmulatorConfig()).start()
        self.env = {**BASE_ENV, "REDIS_URL": redis_url, "QVQ_BASE_URL": self.emulator.url,
                    "DATABASE_URL": f"sqlite:///{tmp / 'qvq.db'}", **env}
        self.workers: list[WorkerProcess] = []
        self.client = Client(Settings.from_env(self.env))
        self.redis = sync_client(redis_url)
        self.image = tmp / "red.png"
        self.image.write_bytes(make_image("PNG", size=(64, 48), color=(220, 20, 20)))

    # -- processes -----------------------------------------------------------------------------
    def start_worker(self, concurrency: int = 30, name: str = "w", **env: str) -> WorkerProcess:
        worker = WorkerProcess({**self.env, **env}, concurrency=concurrency, name=name)
        self.workers.append(worker)
        return worker.start(wait_ready=60)

    def ensure_worker(self, **env: str) -> WorkerProcess:
        alive = [w for w in self.workers if w.process is not None and w.process.poll() is None]
        return alive[0] if alive else self.start_worker(**env)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop(timeout=5)
            if os.environ.get("QVQ_TEST_SHOW_WORKER_LOGS"):
                print(worker.log())
        self.client.close()
        self.redis.close()
        self.emulator.stop()
        if self.redis_server is not None:
            self.redis_server.close()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- tasks ---------------------------------------------------------------------------------
    def submit(self, prompt: str = "What colour is this?", task_id: str | None = None, **emulator: Any) -> str:
        text = f"{prompt} {directive(**emulator)}" if emulator else prompt
        handle = self.client.submit(images=[str(self.image)], prompt=text,
                                    task_id=task_id or f"t-{uuid.uuid4().hex[:12]}")
        return handle.task_id

    def events(self, task_id: str) -> list[dict[str, Any]]:
        return self.client.bus.read_log(task_id)

    def record(self, task_id: str) -> TaskRecord:
        return self.client.get(task_id)

    def wait_terminal(self, task_ids: list[str], timeout: float = 60) -> dict[str, TaskRecord]:
        """Every task's row once all are terminal (persisted), polling the store."""
        pending = set(task_ids)
        records: dict[str, TaskRecord] = {}

        def all_ended() -> bool:
            for record in self.client.store.list_tasks(limit=100_000):
                if record.id in pending and record.status in TERMINAL:
                    records[record.id] = record
                    pending.discard(record.id)
            return not pending

        wait_until(all_ended, timeout, "tasks not terminal", poll_s=0.1,
                   detail=lambda: f"{sorted(pending)[:5]}\n{self.worker_logs()[-3000:]}")
        # The worker writes the row, then publishes the terminal event: give the log a moment to catch up
        # (a test of a lost terminal event asserts on the log itself, so its absence is not an error here).
        with contextlib.suppress(AssertionError, redis.RedisError):  # Redis may be down on purpose
            wait_until(lambda: all(any(ev.is_terminal(e) for e in self.events(i)) for i in task_ids), LOG_SETTLE_S)
        return records

    def wait_events(self, task_id: str, predicate: Any, timeout: float = 20) -> list[dict[str, Any]]:
        def matching() -> list[dict[str, Any]] | None:
            events = self.events(task_id)
            return events if predicate(events) else None

        return wait_until(matching, timeout, f"condition not met for {task_id}",
                          detail=lambda: str([e["type"] for e in self.events(task_id)]))

    def wait_for_terminal_event(self, task_id: str, timeout: float = 20) -> list[dict[str, Any]]:
        return self.wait_events(task_id, lambda es: any(ev.is_terminal(e) for e in es), timeout)

    def stats(self) -> dict[str, int]:
        """The emulator's counters, read over HTTP (GET /_emulator/stats) like any outside observer."""
        response = httpx.get(f"http://{self.emulator.host}:{self.emulator.port}/_emulator/stats", timeout=5)
        response.raise_for_status()
        counters: dict[str, int] = response.json()
        return counters

    def wait_no_active_streams(self, timeout: float = 5) -> float:
        """Seconds until the emulator has no open stream (AssertionError past the timeout)."""
        return seconds_until(lambda: not self.stats()["streams_active"], timeout, "emulator streams still active",
                             poll_s=0.01, detail=lambda: str(self.stats()))

    def worker_logs(self) -> str:
        return "\n".join(w.log() for w in self.workers)

    def log_events(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """Every worker's log lines as data (see WorkerProcess.log_events)."""
        return [entry for worker in self.workers for entry in worker.log_events(event, **fields)]


def text_of(events: list[dict[str, Any]], type_: str) -> str:
    return "".join(e["text"] for e in events if e["type"] == type_)


def after_last_retry(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of the final attempt: after the last task.retrying (or all, if none)."""
    last = max((i for i, e in enumerate(events) if e["type"] == ev.RETRYING), default=-1)
    return events[last + 1:]


def terminal_events(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if ev.is_terminal(e)]
