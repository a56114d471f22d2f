"""The outside systems of one worker process, built once (lazily, after any fork) and passed in."""

from __future__ import annotations

import os
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import redis

from contracts.bus import EventBus
from contracts.settings import Settings, get_settings
from contracts.store import Store
from worker import images
from worker.cancel import CancelWatcher
from worker.fetch import ImageFetcher
from worker.flow import FlowControl
from worker.lease import LeaseKeeper
from worker.model import QvqModel
from worker.publisher import BatchingEventBus

IMAGE_THREADS = 16


@dataclass
class WorkerContext:
    settings: Settings
    redis: redis.Redis
    bus: EventBus
    store: Store
    fetcher: ImageFetcher
    model: QvqModel
    image_pool: ThreadPoolExecutor
    cancels: CancelWatcher
    name: str
    leases: LeaseKeeper
    flow: FlowControl | None = None  # flow control (worker/flow.py); built by `build`

    @classmethod
    def build(cls, settings: Settings) -> WorkerContext:
        client = redis.Redis.from_url(
            settings.redis_url, max_connections=settings.worker_concurrency + 50,
            health_check_interval=30, socket_keepalive=True, retry_on_timeout=True,
            socket_connect_timeout=5, socket_timeout=10,  # a vanished Redis must not hang a stream's thread
        )
        name = f"{socket.gethostname()}:{os.getpid()}"
        images.decode_budget.resize(settings.decode_memory_mb << 20)
        store = Store.from_url(settings.database_url, timeout_s=settings.db_timeout_s)
        flow = FlowControl(settings, client, store)  # once per process, mover started
        flow.start_mover(_send_again)
        return cls(
            settings=settings,
            redis=client,
            bus=BatchingEventBus(client, ttl_s=settings.event_ttl_s),  # group-committed publishes
            store=store,
            fetcher=ImageFetcher(settings),
            model=QvqModel(settings),
            image_pool=ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="qvq-images"),
            cancels=CancelWatcher(client),
            name=name,
            leases=LeaseKeeper(client, ttl_s=settings.lease_ttl_s, owner=name),
            flow=flow,
        )

    def close(self) -> None:
        if self.flow is not None:
            self.flow.stop()
        self.cancels.stop()
        self.leases.stop()
        self.image_pool.shutdown(wait=False, cancel_futures=True)
        self.model.close()
        self.fetcher.close()
        self.store.dispose()
        self.redis.close()


def _send_again(payload: dict[str, Any]) -> None:
    """Put a parked task back on the queue (worker/flow.py's mover)."""
    from contracts.job import TASK_NAME
    from worker.app import app

    app.send_task(TASK_NAME, args=[payload], task_id=payload["task_id"], queue=get_settings().queue,
                  serializer="json")


_context: WorkerContext | None = None
_context_pid: int | None = None
_lock = threading.Lock()


def get_context() -> WorkerContext:
    global _context, _context_pid
    with _lock:
        if _context is None or _context_pid != os.getpid():
            _context = WorkerContext.build(get_settings())
            _context_pid = os.getpid()
        return _context


def close_context() -> None:
    global _context
    with _lock:
        if _context is not None and _context_pid == os.getpid():
            _context.close()
        _context = None
