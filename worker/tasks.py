"""The thin Celery tasks: each hands its message to plain code and tells Celery the truth about the end.

`qvq.reason` (queue QVQ_QUEUE) runs one task (worker/pipeline.py), and Celery's states tell the truth:
- completed (or dropped: a duplicate delivery, a message refused by worker/intake/message.py): SUCCESS;
- failed: TaskUnsuccessful("<code>: <message>") is raised after the terminal state is persisted, so
  Celery records FAILURE with the error code (Flower shows it) and still acknowledges the message
  (task_acks_on_failure_or_timeout);
- cancelled: a `task-revoked` event (Flower shows REVOKED, not failed), then Ignore: acknowledged, no
  failure counted;
- each model-call retry inside the task: a `task-retried` event carrying the attempt about to run;
- the database cannot be reached, or the worker is shutting down and handed the task back: the message
  goes back to the queue (Reject(requeue=True)) and the task runs again as a new attempt, elsewhere.

`qvq.callback` (queue qvq-callbacks) makes one try of a callback delivery (worker/callbacks/deliveries.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from celery import Task, current_task
from celery.exceptions import Ignore, Reject

from contracts import callbacks as cb
from contracts import retry
from contracts.errors import ERROR_CODES, QvqError, StoreUnavailable
from contracts.job import TASK_NAME
from contracts.logging import get_logger
from contracts.store import CANCELLED, FAILED
from worker.callbacks.deliveries import send
from worker.celery import app
from worker.lifecycle import get_context
from worker.pipeline import SUPERSEDED, run_task

log = get_logger(__name__)


class TaskUnsuccessful(QvqError):
    """The task ended failed or cancelled (already persisted and published): Celery's FAILURE."""


F = TypeVar("F", bound=Callable[..., Any])


def task(**options: Any) -> Callable[[F], F]:
    """`app.task(...)`, typed (Celery ships no type hints)."""
    return cast(Callable[[F], F], app.task(**options))


@task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
      throws=(TaskUnsuccessful,))
def reason(self: Task, message: dict[str, Any]) -> str | None:
    ctx = get_context()
    task_id = message.get("task_id") if isinstance(message, dict) else None
    ctx.task_event = send_current_task_event
    try:
        outcome = run_task(message, ctx, delivery_id=self.request.id)
    except StoreUnavailable as exc:
        log.error("task.requeued", task_id=task_id, error=str(exc), pause_s=retry.REQUEUE_PAUSE_S)
        time.sleep(retry.REQUEUE_PAUSE_S)
        raise Reject(str(exc), requeue=True) from exc
    if outcome == SUPERSEDED and ctx.leases.handing_back:
        log.warning("task.handed_back", task_id=task_id, reason="the worker is shutting down")
        raise Reject("handed back at shutdown", requeue=True)
    if outcome == CANCELLED:
        send_current_task_event("task-revoked", terminated=False, signum=None, expired=False)
        raise Ignore()
    if outcome == FAILED:
        record = ctx.store.get(str(task_id))
        code = record.error_code if record is not None else "internal"
        raise TaskUnsuccessful(f"{code}: {record.error_message if record is not None else 'failed'}",
                               code=code if code in ERROR_CODES else "internal")
    return outcome


def send_current_task_event(type_: str, **fields: Any) -> None:
    """A monitoring event for the Celery task this thread runs (nothing outside a task); never raises."""
    task = current_task
    if task is None or not getattr(task.request, "id", None):
        return
    try:
        task.send_event(type_, retry=False, **fields)
    except Exception as exc:  # monitoring never stands in the way of a run
        log.warning("celery.event_failed", type=type_, error=f"{type(exc).__name__}: {exc}")


@task(name=cb.TASK_NAME, acks_late=True, ignore_result=True)
def deliver_callback(event_id: str) -> str | None:
    return send(get_context(), event_id)
