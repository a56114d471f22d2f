"""What a queued task is waiting for: the messages ahead of it in its queue, and the workers consuming it.

Both are read from the broker, cheaply: the queue's length is one LLEN on the list kombu's Redis
transport keeps per queue, and the consumers are the workers that answer a broadcast `active_queues`
within a short timeout (Celery's remote control; it needs no heartbeats, gossip or events).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import redis
from rich.console import Console
from rich.status import Status

PROBE_TIMEOUT_S = 1.0
IDLE_S = 1.5  # without an event for this long, a queued task's viewer says what it waits for
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


@dataclass(frozen=True)
class QueueState:
    queue: str
    depth: int | None  # messages waiting in the queue; None when it could not be read
    consumers: int | None  # workers consuming the queue that answered; None when it could not be read

    def describe(self) -> str:
        if self.consumers == 0:
            return f"no worker is consuming queue {self.queue}: start one with `qvq worker`"
        waiting = "?" if self.depth is None else str(self.depth)
        workers = "?" if self.consumers is None else str(self.consumers)
        return (f"queued: {waiting} message(s) waiting in queue {self.queue}, "
                f"{workers} worker(s) consuming it")


class QueueProbe:
    def __init__(self, celery_app: Any, broker_url: str, queue: str, timeout: float = PROBE_TIMEOUT_S) -> None:
        self.celery_app = celery_app
        self.broker_url = broker_url
        self.queue = queue
        self.timeout = timeout

    def state(self) -> QueueState:
        return QueueState(self.queue, self.depth(), self.consumers())

    def depth(self) -> int | None:
        if not self.broker_url.startswith(_REDIS_SCHEMES):
            return None
        try:
            client = redis.Redis.from_url(self.broker_url, socket_connect_timeout=self.timeout,
                                          socket_timeout=self.timeout)
            try:
                return int(client.llen(self.queue))
            finally:
                client.close()
        except (redis.RedisError, OSError):
            return None

    def consumers(self) -> int | None:
        try:
            replies = self.celery_app.control.inspect(timeout=self.timeout).active_queues() or {}
        except Exception:  # the broker is unreachable: the state says "unknown", the wait goes on
            return None
        return sum(1 for queues in replies.values() if any(q.get("name") == self.queue for q in queues or ()))


class WaitingView:
    """Says what a queued task waits for: a spinner on a terminal; when piped, a plain line each time
    the state changes (no control codes, nothing repeated)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status: Status | None = None
        self._last: str | None = None

    def show(self, state: QueueState) -> None:
        line = state.describe()
        if not self.console.is_terminal:
            if line != self._last:
                self.console.print(line, markup=False, highlight=False)
        elif self._status is None:
            self._status = self.console.status(line)
            self._status.start()
        else:
            self._status.update(line)
        self._last = line

    def stop(self) -> None:
        status, self._status = self._status, None
        if status is not None:
            status.stop()


def events_with_waiting(client: Any, task_id: str, from_seq: int, view: WaitingView,
                        idle_s: float = IDLE_S) -> Iterator[dict[str, Any]]:
    """The task's events; while it sits queued with nothing happening for idle_s, the view says what
    it waits for. The events missed while probing are replayed from the task's log, none lost."""
    probe = QueueProbe(client.celery, client.settings.celery_broker_url, client.settings.queue)
    last_seq, queued = from_seq, True
    try:
        while True:
            try:
                for event in client.events(task_id, from_seq=last_seq, idle_timeout=idle_s if queued else None):
                    view.stop()
                    last_seq, queued = event["seq"], event["type"] == "task.queued"
                    yield event
                return
            except TimeoutError:
                if queued and client.get(task_id).status == "queued":
                    view.show(probe.state())
    finally:
        view.stop()
