"""The thin Celery task: hand the message to the pipeline and tell Celery the truth about the end.

- completed (or dropped: a duplicate delivery, a message refused by worker/message.py): SUCCESS;
- failed or cancelled: TaskUnsuccessful is raised after the terminal state is persisted, so Celery
  records FAILURE (Flower counts it as a failure) and, since the task raised normally, still
  acknowledges the message (task_acks_on_failure_or_timeout);
- the database cannot be reached, or the worker is shutting down and handed the task back: the message
  goes back to the queue (Reject(requeue=True)) and the task runs again as a new attempt, elsewhere.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Task
from celery.exceptions import Reject

from contracts import events as ev
from contracts.job import TASK_NAME
from contracts.logging import get_logger
from contracts.store import CANCELLED, FAILED
from worker.app import app
from worker.context import get_context
from worker.pipeline import SUPERSEDED, StoreUnavailable, run_task

log = get_logger(__name__)
REQUEUE_PAUSE_S = 2.0
CANCEL_TTL_S = 86_400


class TaskUnsuccessful(Exception):
    """The task ended failed or cancelled (already persisted and published): Celery's FAILURE."""


@app.task(name=TASK_NAME, bind=True, acks_late=True, reject_on_worker_lost=True, ignore_result=True,
          throws=(TaskUnsuccessful,))
def reason(self: Task, message: dict[str, Any]) -> str | None:
    ctx = get_context()
    task_id = message.get("task_id") if isinstance(message, dict) else None
    try:
        outcome = run_task(message, ctx, delivery_id=self.request.id)
    except StoreUnavailable as exc:
        log.error("task.requeued", task_id=task_id, error=str(exc), pause_s=REQUEUE_PAUSE_S)
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(str(exc), requeue=True) from exc
    if outcome == SUPERSEDED and ctx.leases.handing_back:
        log.warning("task.handed_back", task_id=task_id, reason="the worker is shutting down")
        raise Reject("handed back at shutdown", requeue=True)
    if outcome in (FAILED, CANCELLED):
        raise TaskUnsuccessful(f"task {task_id} ended {outcome}")
    return outcome


def cancel_revoked(ctx: Any, task_id: str, *, expired: bool = False) -> None:
    """Celery dropped a revoked message: cancel the task (queued: at once; running: its stream stops)."""
    record = ctx.store.get(task_id)
    if record is None or record.is_terminal:
        return
    ctx.redis.set(ev.cancel_key(task_id), "1", ex=CANCEL_TTL_S)
    if ctx.store.cancel_if_queued(task_id):
        ctx.bus.publish(task_id, ev.CANCELLED, record.attempts)
    else:
        ctx.redis.publish(ev.CANCEL_CHANNEL, task_id)
    log.warning("task.revoked", task_id=task_id, expired=expired)
