"""The thin Celery task: decode the payload and hand it to the pipeline.

When the database cannot be reached the message goes back to the queue (after a pause, so an outage
does not become a hot loop) instead of being acknowledged: the task runs again later as a new attempt.
"""

from __future__ import annotations

import time
from typing import Any

from celery.exceptions import Reject

from contracts.job import TASK_NAME
from contracts.logging import get_logger
from worker.app import app
from worker.context import get_context
from worker.pipeline import StoreUnavailable, run_task

log = get_logger(__name__)
REQUEUE_PAUSE_S = 2.0


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def reason(payload: dict[str, Any]) -> str | None:
    try:
        return run_task(payload, get_context())
    except StoreUnavailable as exc:
        log.error("task.requeued", task_id=payload.get("task_id"), error=str(exc), pause_s=REQUEUE_PAUSE_S)
        time.sleep(REQUEUE_PAUSE_S)
        raise Reject(str(exc), requeue=True) from exc
