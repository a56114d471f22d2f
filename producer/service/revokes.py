"""Celery revokes that no worker hears: `celery control revoke ID` (or Flower's button) is a broadcast, and a
broadcast sent while no worker is online reaches nobody, so the task would run to completion later.

The API listens to the same broadcast (its own queue on Celery's `celery.pidbox` fanout exchange) and
turns every `revoke` into the one cancel path (contracts/cancel.py): a queued task's row becomes
cancelled, and the worker that later takes its message finds the row terminal and runs nothing (the row
is the truth). With workers online this repeats what their `task_revoked` handler does; a cancel is
idempotent. Only `revoke` is read: nothing is answered, so the API never shows up as a Celery node.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery
from kombu.entity import Queue
from kombu.messaging import Consumer

from contracts import retry
from contracts.logging import get_logger

log = get_logger(__name__)
POLL_S = 1.0


class RevokeListener:
    """A daemon thread draining the broadcast exchange; `cancel(task_id)` for each revoked id."""

    def __init__(self, app: Celery, cancel: Callable[[str], Any]) -> None:
        self.app = app
        self.cancel = cancel
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qvq-revokes", daemon=True)
        self.ready = threading.Event()  # the queue is bound: revokes from now on are heard

    def start(self) -> RevokeListener:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=POLL_S * 3)

    def _run(self) -> None:
        failures = 0
        while not self._stopped.is_set():
            try:
                self._listen()
                failures = 0
            except Exception as exc:  # the broker went away: listen again after a pause
                failures += 1
                log.warning("revokes.listen_failed", error=type(exc).__name__)
                self._stopped.wait(retry.SUBSCRIBE_RECONNECT.delay(failures))

    def _listen(self) -> None:
        exchange = self.app.control.mailbox.exchange
        queue = Queue(f"qvq-api-revokes.{uuid.uuid4().hex}", exchange, durable=False,  # type: ignore[no-untyped-call]
                      auto_delete=True, no_ack=True)
        with self.app.connection_for_read() as connection:
            consumer = Consumer(connection, [queue], callbacks=[self._take],  # type: ignore[no-untyped-call]
                                accept=["json"], no_ack=True)
            with consumer:
                self._drain(connection)

    def _drain(self, connection: Any) -> None:
        self.ready.set()
        while not self._stopped.is_set():
            try:
                connection.drain_events(timeout=POLL_S)
            except TimeoutError:
                continue

    def _take(self, body: Any, _message: Any) -> None:
        if not isinstance(body, dict) or body.get("method") != "revoke":
            return
        arguments = body.get("arguments") or {}
        for task_id in _ids(arguments.get("task_id")):
            try:
                self.cancel(task_id)
                log.info("task.revoke_heard", task_id=task_id)
            except Exception as exc:  # an unknown id, or the store away: the next revoke may do it
                log.warning("task.revoke_failed", task_id=task_id, error=type(exc).__name__)


def _ids(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [item for item in value if isinstance(item, str)]
    return []
