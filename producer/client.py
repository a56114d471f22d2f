"""The Python client: submit a job, follow its events, wait for its result, cancel it.

    client = Client()
    handle = client.submit(images=["s3://bucket/photo.jpg"], prompt="What is wrong with this circuit?")
    for event in handle.events():
        ...
    result = handle.result(timeout=300)

A failed or cancelled task can be queued again with `client.retry(task_id)`: same id, a new run
(its task.queued carries `run`: 1, 2, ...). Following from seq 0 replays every run and ends at the
latest run's terminal event; `retry` also returns the seq to follow the new run alone from.

Every follower (`events`, `result`) also reads the task's row while it waits: a task whose row is
terminal ends its viewers even when its terminal event never reached Redis (contracts/subscription.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import redis
import sqlalchemy as sa
from celery import Celery

from contracts import events as ev
from contracts.bus import EventBus
from contracts.errors import QvqError, RequestError
from contracts.flow import held_back
from contracts.job import TASK_NAME, UPLOAD_REF, JobRequest, message_for, parse_job
from contracts.settings import Settings, get_settings
from contracts.store import ANY_TENANT, CANCELLED, FAILED, QUEUED, RUNNING, Outcome, Store, TaskRecord
from contracts.subscription import ResultWait


class TaskClient(Protocol):
    """What a TaskHandle needs of its client (Client and producer.http_client.HttpClient have it)."""

    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]: ...
    def result(self, task_id: str, timeout: float | None = None) -> Any: ...
    def get(self, task_id: str) -> Any: ...
    def cancel(self, task_id: str) -> bool: ...
    def retry(self, task_id: str) -> int: ...


C = TypeVar("C", bound=TaskClient)
CANCEL_TTL_S = 86_400
RESULT_RECHECK_S = 5.0  # result() re-reads the row this often while it waits for the terminal event
WAITING = "waiting"  # a listing filter, not a status: queued or running, held back by flow control


class EnqueueError(QvqError):
    """The job could not be handed to the queue (Redis or the broker is unreachable); nothing was lost.

    `message` is safe to show anyone; `detail` (the underlying error, which may name a host) is for logs."""

    default_code = "internal"

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail


@dataclass(frozen=True)
class TaskHandle(Generic[C]):
    """One task of a client (the Redis `Client` or the HTTP `HttpClient`): its id and shortcuts."""

    task_id: str
    created: bool  # False when an idempotency key returned an earlier task
    client: C

    def events(self, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        return self.client.events(self.task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout)

    def result(self, timeout: float | None = None) -> Any:
        return self.client.result(self.task_id, timeout=timeout)

    def status(self) -> str:
        return str(self.client.get(self.task_id).status)

    def cancel(self) -> bool:
        return self.client.cancel(self.task_id)

    def retry(self) -> int:
        return self.client.retry(self.task_id)


class Client:
    def __init__(self, settings: Settings | None = None, *, store: Store | None = None,
                 redis_client: redis.Redis | None = None) -> None:
        self.settings = settings or get_settings()
        self.redis = redis_client or redis.Redis.from_url(
            self.settings.redis_url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
        self.bus = EventBus(self.redis, ttl_s=self.settings.event_ttl_s)
        self.store = store or Store.from_url(self.settings.database_url)
        self._celery: Celery | None = None

    # -- submit --------------------------------------------------------------------------------
    def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
               **fields: Any) -> TaskHandle[Client]:
        """Validate and enqueue one job (fields as in the job request table); returns its handle."""
        request = {"images": [_as_ref(ref) for ref in images], "prompt": prompt, **fields}
        if model is not None:
            request["model"] = model
        return self.submit_request(request)

    def submit_request(self, request: dict[str, Any], *, local_files: bool = True) -> TaskHandle[Client]:
        """Validate and enqueue a job request (a dict as in design.md). `local_files=False` refuses
        references to files on this machine (the HTTP API's callers are elsewhere)."""
        job = parse_job(request, default_model=self.settings.model, local_files=local_files)
        try:
            self._check_conversation(job)
            self._check_uploads(job)
            record, created = self.store.create_task(job)
        except (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError) as exc:
            raise EnqueueError(f"could not record task {job.task_id}: the database is unavailable",
                               detail=str(exc)) from exc
        if not created:
            return TaskHandle(record.id, False, self)
        self._enqueue(job, record=record)
        return TaskHandle(job.task_id, True, self)

    def _check_conversation(self, job: JobRequest) -> None:
        """A turn continues a conversation of its own tenant, or starts one (with images)."""
        if not job.conversation_id:
            return
        exists, owner = self.store.conversation_tenant(job.conversation_id)
        if (exists and owner != job.tenant) or (not exists and not job.images):
            raise RequestError(f"no conversation {job.conversation_id!r}" + ("" if exists else
                               "; a new conversation starts with a turn that has images"),
                               field="conversation_id", code="conversation.not_found")

    def _check_uploads(self, job: JobRequest) -> None:
        """upload:// references only to live uploads of the job's own tenant."""
        for index, ref in enumerate(job.images):
            match = UPLOAD_REF.fullmatch(ref)
            if match is None:
                continue
            upload = self.store.get_upload(match.group(1))
            if upload is None or upload.tenant != job.tenant or not upload.is_live():
                raise RequestError("no such upload (or it expired); upload the image again",
                                   field=f"images[{index}]", code="image.not_found")

    def _enqueue(self, job: JobRequest, attempt: int = 0, *, record: TaskRecord | None = None,
                 clear_cancel: bool = False) -> int:
        """Publish task.queued (with the run it starts, seq above every seq the row knows of) and
        send the Celery task; returns the seq of task.queued, which the row remembers.

        Fails within seconds when Redis or the broker is down (no waiting for it to come back): the
        row is marked failed (`qvq retry` queues it again) and EnqueueError is raised.
        """
        floor = record.last_seq if record else 0
        try:
            if clear_cancel:  # the cancel of an earlier run must not stop this one
                self.redis.delete(ev.cancel_key(job.task_id))
            seq = self.bus.publish(job.task_id, ev.QUEUED, attempt, seq_floor=floor, **queued_fields(job, record))
            self._send(job, record.run if record else 0)
        except Exception as exc:
            message = self._enqueue_failed(job, attempt, exc)
            with contextlib.suppress(Exception):  # a subscriber that saw task.queued must see the end too
                self.bus.publish(job.task_id, ev.FAILED, attempt, seq_floor=floor,
                                 error={"code": "internal", "message": message, "retryable": True})
            raise EnqueueError(message, detail=str(exc)) from exc
        self.note_seq(job.task_id, seq)
        return seq

    def _send(self, job: JobRequest, run: int = 0) -> None:
        self.celery.send_task(
            # Only which task and run: the worker reads the request from the task row.
            TASK_NAME, args=[message_for(job.task_id, run)], task_id=job.task_id,
            queue=self.settings.queue, serializer="json",
            retry=True, retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5,
                                      "interval_max": 1.0},
        )

    def _enqueue_failed(self, job: JobRequest, attempt: int, exc: Exception) -> str:
        """Mark the row failed after a failed enqueue; returns the message of its task.failed."""
        message = f"could not enqueue task {job.task_id}: the queue is unavailable ({type(exc).__name__})"
        self.store.finish(job.task_id, Outcome(status=FAILED, attempt=attempt, error_code="internal",
                                                error_message=message))
        return message

    def note_seq(self, task_id: str, seq: int) -> None:
        """The row remembers the highest seq published (the floor after Redis lost its counters)."""
        with contextlib.suppress(sa.exc.SQLAlchemyError):  # a missed note only lowers a later floor
            self.store.note_seq(task_id, seq)

    # -- retry ---------------------------------------------------------------------------------
    def retry(self, task_id: str) -> int:
        """Queue a failed or cancelled task again: same task id, a new run, seq continuing.

        Returns the seq to follow the new run alone from (that of its task.queued minus 1); following
        from 0 replays the earlier runs too and ends at this run's end. The attempt cap
        (QVQ_MAX_ATTEMPTS) counts from this retry. RequestError when the task is not failed or cancelled.
        """
        requeued = self.requeue(task_id)
        job = JobRequest.from_payload(requeued.request)
        return self._enqueue(job, attempt=requeued.attempts, record=requeued, clear_cancel=True) - 1

    def requeue(self, task_id: str) -> TaskRecord:
        """The row moved back to queued for a new run; RequestError when it is not failed or cancelled."""
        record = self.get(task_id)
        requeued = self.store.requeue(task_id)
        if requeued is None and record.status == RUNNING and self._orphaned(task_id):
            requeued = self.store.requeue(task_id, statuses=(RUNNING,))  # its worker died: no lease
        if requeued is None:
            status = self.get(task_id).status
            raise RequestError(f"task {task_id} is {status}: only failed or cancelled tasks can be retried",
                               field="task_id")
        return requeued

    @property
    def celery(self) -> Celery:
        if self._celery is None:
            app = Celery("qvq-producer", set_as_current=False)
            app.conf.update(
                broker_url=self.settings.celery_broker_url,
                broker_connection_timeout=5,
                broker_connection_retry=False,
                broker_transport_options={"visibility_timeout": self.settings.visibility_timeout_s},
                task_serializer="json",
                accept_content=["json"],
            )
            self._celery = app
        return self._celery

    # -- read ----------------------------------------------------------------------------------
    def handle(self, task_id: str) -> TaskHandle[Client]:
        self.get(task_id)
        return TaskHandle(task_id, False, self)

    def get(self, task_id: str) -> TaskRecord:
        record = self.store.get(task_id)
        if record is None:
            raise KeyError(f"no task {task_id!r}")
        return record

    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """Every event of the task after from_seq, replayed then live, ending after the terminal event
        of its latest run (made from the row, `from_row: true`, when it never reached Redis).

        TimeoutError after `timeout` seconds in all, or `idle_timeout` seconds without an event.
        """
        return self.bus.subscribe(task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout,
                                  row=self.store.get)

    follow = events

    def result(self, task_id: str, timeout: float | None = None) -> TaskRecord:
        """Block until the task is terminal (or TimeoutError) and return the persisted record."""
        record = self.get(task_id)
        wait = ResultWait(task_id, timeout, record)
        while not record.is_terminal:
            # The subscription reads the row too: it ends when the row is terminal, event or not.
            try:
                for event in self.events(task_id, from_seq=wait.from_seq, timeout=wait.remaining()):
                    wait.saw(event)
            except TimeoutError:
                raise wait.timed_out() from None
            record = self._wait_for_row(task_id, wait.settle_deadline(RESULT_RECHECK_S))
        return record

    def _wait_for_row(self, task_id: str, deadline: float | None) -> TaskRecord:
        # The worker persists before it publishes, but the log may outlive the row's status change by
        # a moment on replicas; poll briefly.
        while True:
            record = self.get(task_id)
            if record.is_terminal or (deadline is not None and time.monotonic() > deadline):
                return record
            time.sleep(0.05)

    def list_records(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
                     tenant: Any = ANY_TENANT, before: tuple[dt.datetime, str] | None = None) -> list[TaskRecord]:
        """Task rows, newest first; `status="waiting"`: queued or running ones flow control holds back."""
        if status != WAITING:
            return self.store.list_tasks(status=status, since=since, limit=limit, tenant=tenant, before=before)
        found: list[TaskRecord] = []
        while len(found) < limit:  # a page of queued and running rows at a time, kept when held back
            page = self.store.list_tasks(statuses=(QUEUED, RUNNING), since=since, limit=limit, tenant=tenant,
                                         before=before)
            waiting = held_back(self.redis, [record.id for record in page])
            found += [record for record in page if record.id in waiting]
            if len(page) < limit:
                break
            before = (page[-1].created_at, page[-1].id)
        return found[:limit]

    def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
              tenant: str | None = None) -> list[dict[str, Any]]:
        """The tasks' summaries, newest first (as GET /v1/tasks and HttpClient.tasks give them)."""
        scope = ANY_TENANT if tenant is None else tenant
        return [record.summary() for record in self.list_records(status=status, since=since, limit=limit,
                                                                 tenant=scope)]

    # -- cancel --------------------------------------------------------------------------------
    def cancel(self, task_id: str) -> bool:
        """Stop a queued or running task; False when it had already finished."""
        record = self.get(task_id)
        if record.is_terminal:
            return False
        self.redis.set(ev.cancel_key(task_id), "1", ex=CANCEL_TTL_S)
        if self.store.cancel_if_queued(task_id):
            self.note_seq(task_id, self.bus.publish(task_id, ev.CANCELLED, record.attempts,
                                                    seq_floor=record.last_seq))
            return True
        if record.status == RUNNING and self._orphaned(task_id) and self.store.finish(
                task_id, Outcome(status=CANCELLED, attempt=record.attempts)):
            self.bus.publish(task_id, ev.CANCELLED, record.attempts)  # no live worker would
            self.redis.publish(ev.CANCEL_CHANNEL, task_id)  # unless Redis lost a live one's lease
            return True
        self.redis.publish(ev.CANCEL_CHANNEL, task_id)
        return True

    def _orphaned(self, task_id: str) -> bool:
        """A running task whose worker died: nobody holds its lease."""
        return not self.redis.exists(ev.lease_key(task_id))

    def close(self) -> None:
        self.store.dispose()
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def queued_fields(job: JobRequest, record: TaskRecord | None) -> dict[str, Any]:
    """The fields of a task.queued: what runs, and which run it starts (0 for the first)."""
    return {"model": job.model, "image_count": len(job.images), "run": record.run if record else 0}


def _as_ref(ref: str) -> str:
    """A local path becomes an absolute file:// reference, so a worker elsewhere on the host finds it."""
    if "://" in ref:
        return ref
    return "file://" + os.path.abspath(os.path.expanduser(ref))
