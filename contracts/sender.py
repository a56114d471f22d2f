"""Sending Celery tasks: the one place a task message is sent, by the producer and the worker alike.

    TaskSender(app, queue).send_run(task_id, run)   qvq.reason for one run of a task (the row holds the request)
    TaskSender(...).send_message(message)           the same for a message as it was queued (a parked task)
    TaskSender(...).send_callback(event_id)         qvq.callback, one try of a callback delivery

The producer builds its own light Celery app (`producer_app`); the worker passes the app it runs.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from celery import Celery

from contracts import broker, retry
from contracts import callbacks as cb
from contracts.job import TASK_NAME, message_for
from contracts.redis_clients import celery_broker
from contracts.settings import Settings

BROKER_CONNECT_TIMEOUT_S = 5
SEND_THREADS = 8  # within Celery's producer pool (broker_pool_limit, 10 by default)


def producer_app(settings: Settings, *, sent_events: bool = True) -> Celery:
    """A Celery app that only sends (no worker code): fails fast when the broker is down. `sent_events`:
    announce each task to monitors (Flower, `celery events`) as it is sent; a batch's app does not (10,000
    task-sent events cost 4.5 s of a 10,000-item submit; its items show up when a worker receives them)."""
    app = Celery("qvq-producer", set_as_current=False)
    broker_url, transport_options = celery_broker(settings.celery_broker_url)
    app.conf.update(
        broker_url=broker_url,
        broker_connection_timeout=BROKER_CONNECT_TIMEOUT_S,
        broker_connection_retry=False,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s, **transport_options},
        task_serializer="json",
        accept_content=["json"],
        task_send_sent_event=sent_events,  # Flower and `celery events` see each task from its submit on
    )
    return app


class TaskSender:
    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def send_run(self, task_id: str, run: int) -> None:
        """Queue one run of a task: only which task and run, the worker reads the request from the row."""
        self.send_message(message_for(task_id, run))

    def send_runs(self, runs: list[tuple[str, int]]) -> None:
        """Queue many runs at once (a batch's page): SEND_THREADS sends in flight, each on a producer of
        the app's pool, so the broker's round trips overlap (one at a time: 4.9 ms per run on a loaded
        2-core machine, 2,000 runs in 9.8 s). The first failure is raised after the rest were tried."""
        if len(runs) <= 1:
            for task_id, run in runs:
                self.send_run(task_id, run)
            return
        with ThreadPoolExecutor(min(SEND_THREADS, len(runs)), thread_name_prefix="qvq-send") as pool:
            futures = [pool.submit(self.send_run, task_id, run) for task_id, run in runs]
        for future in futures:
            future.result()

    def send_message(self, message: dict[str, Any]) -> None:
        self.app.send_task(TASK_NAME, args=[message], task_id=str(message["task_id"]), queue=self.queue,
                           serializer="json", retry=True, retry_policy=retry.ENQUEUE, headers=_sent_now())

    def send_callback(self, event_id: str) -> None:
        self.app.send_task(cb.TASK_NAME, args=[event_id], queue=cb.QUEUE, serializer="json",
                           retry=True, retry_policy=retry.ENQUEUE, headers=_sent_now())


def _sent_now() -> dict[str, float]:
    """The header the queue-age metric reads (contracts/broker.py)."""
    return {broker.SENT_AT: time.time()}
