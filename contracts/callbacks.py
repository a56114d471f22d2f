"""Callback deliveries, the parts producer and worker share: the Celery task and queue names, and the event
id receivers dedupe by (the retry schedule is contracts/retry.CALLBACK_DELIVERY, the due set keys.CALLBACKS_DUE).

    event id   "<task_id>:<run>:<seq>"   (header X-Qvq-Event-Id, and `event_id` in the body)
"""

from __future__ import annotations

TASK_NAME = "qvq.callback"
QUEUE = "qvq-callbacks"
EVENT_ID_HEADER = "X-Qvq-Event-Id"


def event_id(task_id: str, run: int, seq: int | None) -> str:
    return f"{task_id}:{run}:{seq if seq is not None else 0}"
