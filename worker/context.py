"""The outside systems of one worker process, built once (after any fork) and passed to every step.

`WorkerContext.build` connects nothing it does not need yet and starts no thread; `start()` starts the
context's own loops (the event loop of worker/loop.py, lease renewals, the cancel watcher, the flow mover) and `close()` stops them and
closes every client. worker/lifecycle.py decides when (and starts the process-wide loops itself).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import redis
import redis.asyncio as aioredis
from redis import Redis as SyncRedis

from contracts.bus import EventBus
from contracts.redis_clients import async_client, sync_client
from contracts.sender import TaskSender, producer_app
from contracts.settings import Settings
from contracts.store import Store
from worker.flow.control import FlowControl
from worker.intake.fetch import ImageFetcher
from worker.intake.memory import decode_budget
from worker.loop import WorkerLoop
from worker.persist import free_gate_on_queries
from worker.recovery.cancel import CancelWatcher
from worker.recovery.lease import LeaseKeeper
from worker.stream.model import QvqModel
from worker.stream.publisher import LoopEventBus

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
    sender: TaskSender
    flow: FlowControl | None = None  # flow control (worker/flow/); built by `build`
    loop: WorkerLoop = field(default_factory=WorkerLoop)  # owns every wait (worker/loop.py)
    aredis: aioredis.Redis | None = None  # the loop's Redis client (event publishing)
    broker: SyncRedis | None = None  # CELERY_BROKER_URL's Redis, when it is not REDIS_URL's (the sweep)
    #: a Celery monitoring event for the task this thread runs (worker/tasks.py sets it; none elsewhere)
    task_event: Callable[..., None] = field(default=lambda _type, **_fields: None)

    @classmethod
    def build(cls, settings: Settings, sender: TaskSender | None = None) -> WorkerContext:
        client = sync_client(
            settings.redis_url, max_connections=settings.worker_concurrency + 50,
            health_check_interval=30, socket_keepalive=True, retry_on_timeout=True,
            socket_connect_timeout=5, socket_timeout=10,  # a vanished Redis must not hang a stream's thread
        )
        name = f"{socket.gethostname()}:{os.getpid()}"
        decode_budget.resize(settings.decode_memory_mb << 20)
        store = Store.from_url(settings.database_url, timeout_s=settings.db_timeout_s)
        free_gate_on_queries(store.engine)
        loop = WorkerLoop()
        aclient = async_client(settings.redis_url, health_check_interval=30, socket_keepalive=True,
                                          socket_connect_timeout=5, socket_timeout=10)
        return cls(
            settings=settings,
            redis=client,
            bus=LoopEventBus(client, aclient, loop, ttl_s=settings.event_ttl_s),  # group-committed on the loop
            store=store,
            fetcher=ImageFetcher(settings),
            model=QvqModel(settings),
            image_pool=ThreadPoolExecutor(IMAGE_THREADS, thread_name_prefix="qvq-images"),
            cancels=CancelWatcher(client),
            name=name,
            leases=LeaseKeeper(client, ttl_s=settings.lease_ttl_s, owner=name),
            sender=sender or TaskSender(producer_app(settings), settings.queue),
            flow=FlowControl(settings, client, store),
            loop=loop,
            aredis=aclient,
            broker=(sync_client(settings.celery_broker_url, socket_connect_timeout=5, socket_timeout=10)
                    if settings.celery_broker_url != settings.redis_url else None),
        )

    def start(self) -> WorkerContext:
        """Start the context's loops: the event loop, lease renewals, the cancel watcher, the mover of
        parked tasks."""
        self.loop.start()
        self.leases.start()
        self.cancels.start()
        if self.flow is not None:
            self.flow.parking.start(self.sender.send_message)
        return self

    def close(self) -> None:
        if self.flow is not None:
            self.flow.stop()
        self.cancels.stop()
        self.leases.stop()
        self.image_pool.shutdown(wait=False, cancel_futures=True)
        self.loop.run(self._close_async())
        self.loop.stop()
        self.fetcher.close()
        self.store.dispose()
        self.redis.close()
        if self.broker is not None:
            self.broker.close()

    async def _close_async(self) -> None:
        await self.model.aclose()
        if self.aredis is not None:
            await self.aredis.aclose()
