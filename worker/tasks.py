"""The thin Celery task: decode the payload and hand it to the pipeline."""

from __future__ import annotations

from typing import Any

from contracts.job import TASK_NAME
from worker.app import app
from worker.context import get_context
from worker.pipeline import run_task


@app.task(name=TASK_NAME, acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def reason(payload: dict[str, Any]) -> str | None:
    return run_task(payload, get_context())
