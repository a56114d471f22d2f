"""The producer's operations, under every way in (the HTTP API's routes and webhooks, the Python client,
the CLI): each takes the principal it acts for and answers records, or raises a QvqError.

    tasks.py       submit, get, cancel, retry, list, usage, limits
    uploads.py     images uploaded over HTTP
    callbacks.py   a task's callback delivery: show, redeliver
    batches.py     batches: submit (list, estimate, queue), view, results, cancel, retry

`Services.build(settings)` wires them over one store, one Redis client and one task sender.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from contracts.redis_clients import sync_client
from contracts.sender import TaskSender, producer_app
from contracts.settings import Settings
from contracts.store import Store
from contracts.uploads import UploadStorage
from producer.service.batches import BatchService
from producer.service.callbacks import CallbackService
from producer.service.tasks import Submitted, TaskService
from producer.service.uploads import UploadService

__all__ = ["BatchService", "CallbackService", "Services", "Submitted", "TaskService", "UploadService"]


@dataclass
class Services:
    tasks: TaskService
    uploads: UploadService
    callbacks: CallbackService
    batches: BatchService

    @classmethod
    def build(cls, settings: Settings, *, store: Store | None = None, client: redis.Redis | None = None,
              storage: UploadStorage | None = None, migrate: bool = True) -> Services:
        """`migrate=False`: a read-only user, which never creates or changes the schema."""
        store = store or Store.from_url(settings.database_url, migrate=migrate)
        client = client or sync_client(
            settings.redis_url, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30)
        sender = TaskSender(producer_app(settings), settings.queue)
        tasks = TaskService(settings, store, client, sender)
        return cls(tasks, UploadService(settings, store, storage or UploadStorage(settings)),
                   CallbackService(tasks, store, sender), BatchService(tasks))

    def close(self) -> None:
        self.batches.close()
        self.tasks.store.dispose()
        self.tasks.redis.close()
