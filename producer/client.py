"""The Python client that talks to Redis and the database directly: submit a job, follow its events, wait
for its result, cancel and retry it, list tasks and usage. It acts as an admin (every tenant's tasks).

    client = Client()
    handle = client.submit(images=["s3://bucket/photo.jpg"], prompt="What is wrong with this circuit?")
    for event in handle.events():
        ...
    result = handle.result(timeout=300)

A failed or cancelled task can be queued again with `client.retry(task_id)`: same id, a new run
(its task.queued carries `run`: 1, 2, ...). Following from seq 0 replays every run and ends at the
latest run's terminal event; `retry` also returns the seq to follow the new run alone from.

Every follower (`events`, `result`) also reads the task's row while it waits: a task whose row is
terminal ends its viewers even when its terminal event never reached Redis (contracts/bus/subscription.py).
Each operation is the service layer's (producer/service/), as the HTTP API's are.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator, Sequence
from typing import Any

import redis
from celery import Celery

from contracts import tracing
from contracts.batches.follow import BatchFollow, follow
from contracts.batches.progress import ENDED
from contracts.bus import EventBus
from contracts.settings import Settings, get_settings
from contracts.store import Store, TaskRecord
from contracts.tenants import ADMIN
from producer.protocol import TaskHandle
from producer.results import wait_for_result
from producer.service import Services
from producer.service.batches import render_results
from producer.service.queue import QueueProbe, QueueState
from producer.service.tasks import not_found


class Client:
    uploads_local_files = False  # a worker on this host reads them (QVQ_ALLOW_LOCAL_FILES=1)

    def __init__(self, settings: Settings | None = None, *, store: Store | None = None,
                 redis_client: redis.Redis | None = None, read_only: bool = False) -> None:
        """`read_only`: for reading commands, which never create or migrate the database's tables."""
        self.settings = settings or get_settings()
        self.services = Services.build(self.settings, store=store, client=redis_client, migrate=not read_only)
        self.redis: redis.Redis = self.services.tasks.redis
        self.store: Store = self.services.tasks.store
        self.bus: EventBus = self.services.tasks.bus

    @property
    def celery(self) -> Celery:
        """The Celery app that sends this client's tasks (only sends: no worker code)."""
        return self.services.tasks.sender.app

    # -- submit, cancel, retry -----------------------------------------------------------------
    def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
               **fields: Any) -> TaskHandle[Client]:
        """Validate and enqueue one job (fields as in the job request table); returns its handle.
        Local paths become file:// references (a worker reads them with QVQ_ALLOW_LOCAL_FILES=1).
        `traceparent=` (and `tracestate=`) names the trace the task continues; by default, the caller's
        current OpenTelemetry span."""
        trace = tracing.given(fields)
        request = {"images": [as_ref(ref) for ref in images], "prompt": prompt, **fields}
        if model is not None:
            request["model"] = model
        return self.submit_request(request, trace=trace)

    def submit_request(self, request: dict[str, Any], *, local_files: bool = True,
                       trace: tracing.Carrier | None = None) -> TaskHandle[Client]:
        """Validate and enqueue a job request (a dict as in the README). `local_files=False` refuses
        references to files on this machine; `trace`: the trace to continue (default: the current span)."""
        submitted = self.services.tasks.submit(ADMIN, request, local_files=local_files,
                                               trace=trace or tracing.current())
        return TaskHandle(submitted.record.id, submitted.created, self)

    def cancel(self, task_id: str) -> bool:
        """Stop a queued or running task; False when it had already finished."""
        return self.services.tasks.cancel(ADMIN, task_id)

    def retry(self, task_id: str) -> int:
        """Queue a failed or cancelled task again (same id, a new run); returns the seq to follow it from."""
        return self.services.tasks.retry(ADMIN, task_id)

    # -- read ----------------------------------------------------------------------------------
    def handle(self, task_id: str) -> TaskHandle[Client]:
        self.get(task_id)
        return TaskHandle(task_id, False, self)

    def get(self, task_id: str) -> TaskRecord:
        """The task's row; NotFoundError (a KeyError) for an unknown task."""
        record = self.store.get(task_id)
        if record is None:
            raise not_found(task_id)
        return record

    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Every event of the task after from_seq, replayed then live, ending after the terminal event
        of its latest run (made from the row, `from_row: true`, when it never reached Redis).

        WaitTimeout (a TimeoutError) after `timeout` seconds in all, or `idle_timeout` without an event.
        """
        return self.bus.subscribe(task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout,
                                  row=self.store.get)

    follow = events

    def result(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Block until the task is terminal (or WaitTimeout) and return the persisted record."""
        return wait_for_result(self, task_id, timeout)

    def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
              tenant: str | None = None) -> list[dict[str, Any]]:
        """The tasks' summaries, newest first (as GET /v1/tasks and HttpClient.tasks give them)."""
        return [record.summary() for record in self.services.tasks.tasks(
            ADMIN, status=status, since=since, limit=limit, tenant=tenant)]

    def usage(self, by: str = "model", *, since: dt.datetime | None = None, until: dt.datetime | None = None,
              tenant: str | None = None) -> dict[str, Any]:
        """Tokens and cost from the ledger: {"rows": [...], "total": {...}}, money as decimal strings."""
        return self.services.tasks.usage(ADMIN, by, since=since, until=until, tenant=tenant)

    def limits(self) -> dict[str, Any]:
        return self.services.tasks.limits()

    def callback(self, task_id: str) -> dict[str, Any] | None:
        return self.services.callbacks.show(ADMIN, task_id)

    def redeliver_callback(self, task_id: str) -> dict[str, Any]:
        return self.services.callbacks.redeliver(ADMIN, task_id)

    def conversation_exists(self, conversation_id: str) -> bool:
        return self.services.tasks.conversation_exists(ADMIN, conversation_id)

    # -- batches -------------------------------------------------------------------------------
    def submit_batch(self, request: dict[str, Any]) -> dict[str, Any]:
        """A batch (README, Batches): estimated, then every item queued; a dry run only estimates."""
        return self.services.batches.submit(ADMIN, request, local_files=True)

    def batch(self, batch_id: str) -> dict[str, Any]:
        return self.services.batches.view(ADMIN, batch_id)

    def cancel_batch(self, batch_id: str) -> dict[str, Any]:
        return self.services.batches.cancel(ADMIN, batch_id)

    def retry_batch(self, batch_id: str) -> dict[str, Any]:
        return self.services.batches.retry(ADMIN, batch_id)

    def batch_events(self, batch_id: str, from_seq: int = 0) -> Iterator[dict[str, Any]]:
        """batch.progress and batch.completed, replayed then live, ending at the batch's end."""
        record = self.services.batches.get(ADMIN, batch_id)
        state = BatchFollow(batch_id, from_seq=from_seq, round_=record.round)
        return follow(self.redis, state, lambda: self.batch(batch_id)["status"] in ENDED)

    def batch_results(self, batch_id: str, fmt: str = "jsonl") -> Iterator[str]:
        """The finished items, a line each in the batch's order (JSON Lines, or CSV with its header)."""
        return render_results(self.services.batches.results(ADMIN, batch_id), fmt)

    def queue_state(self) -> QueueState:
        """The messages waiting in this client's queue and the workers consuming it."""
        return QueueProbe(self.celery, self.settings.celery_broker_url, self.settings.queue).state()

    def ping(self) -> None:
        """Raise when Redis cannot be reached (before a command touches anything)."""
        self.redis.ping()

    def close(self) -> None:
        self.services.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def as_ref(ref: str) -> str:
    """A local path becomes an absolute file:// reference, so a worker elsewhere on the host finds it."""
    if "://" in ref:
        return ref
    return "file://" + os.path.abspath(os.path.expanduser(ref))
