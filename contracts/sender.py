"""Sending Celery tasks: the one place a task message is sent, by the producer and the worker alike.

    TaskSender(app, queue).send_run(task_id, run)   qvq.reason for one run of a task (the row holds the request)
    TaskSender(...).send_message(message)           the same for a message as it was queued (a parked task)
    TaskSender(...).send_callback(event_id)         qvq.callback, one try of a callback delivery

The producer builds its own light Celery app (`producer_app`); the worker passes the app it runs.
"""

from __future__ import annotations

import time
from typing import Any

from celery import Celery

from contracts import broker, retry
from contracts import callbacks as cb
from contracts.job import TASK_NAME, message_for
from contracts.settings import Settings

BROKER_CONNECT_TIMEOUT_S = 5


def producer_app(settings: Settings) -> Celery:
    """A Celery app that only sends (no worker code): fails fast when the broker is down."""
    app = Celery("qvq-producer", set_as_current=False)
    app.conf.update(
        broker_url=settings.celery_broker_url,
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT_S,
        broker_connection_retry=False,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        task_serializer="json",
        accept_content=["json"],
        task_send_sent_event=True,  # Flower and `celery events` see each task from its submit on
    )
    return app


class TaskSender:
    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def send_run(self, task_id: str, run: int) -> None:
        """Queue one run of a task: only which task and run, the worker reads the request from the row."""
        self.send_message(message_for(task_id, run))

    def send_message(self, message: dict[str, Any]) -> None:
        self.app.send_task(TASK_NAME, args=[message], task_id=str(message["task_id"]), queue=self.queue,
                           serializer="json", retry=True, retry_policy=retry.ENQUEUE, headers=_sent_now())

    def send_callback(self, event_id: str) -> None:
        self.app.send_task(cb.TASK_NAME, args=[event_id], queue=cb.QUEUE, serializer="json",
                           retry=True, retry_policy=retry.ENQUEUE, headers=_sent_now())


def _sent_now() -> dict[str, float]:
    """The header the queue-age metric reads (contracts/broker.py)."""
    return {broker.SENT_AT: time.time()}
