"""What a queued task is waiting for: the messages ahead of it in its queue, and the workers consuming it.

Both are read from the broker, cheaply: the queue's length is one round trip on the lists kombu's Redis
transport keeps per queue (contracts/broker.py), and the consumers are the workers that answer a broadcast
`active_queues` within a short timeout (Celery's remote control; it needs no heartbeats, gossip or events).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import redis

from contracts import broker
from contracts.redis_clients import sync_client
from contracts.redis_url import is_redis

PROBE_TIMEOUT_S = 1.0


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
        if not is_redis(self.broker_url):
            return None
        try:
            client = sync_client(self.broker_url, socket_connect_timeout=self.timeout,
                                 socket_timeout=self.timeout)
            try:
                return broker.depth(client, self.queue)
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
