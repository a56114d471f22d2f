"""A task's callback delivery as the producer sees it: show it, and send it again (one redelivery path
for the API, the CLI and the Python client)."""

from __future__ import annotations

from typing import Any

from contracts.errors import ConflictError
from contracts.logging import get_logger
from contracts.sender import TaskSender
from contracts.store import Store
from contracts.tenants import Principal
from producer.service.tasks import TaskService

log = get_logger(__name__)


class CallbackService:
    def __init__(self, tasks: TaskService, store: Store, sender: TaskSender) -> None:
        self.tasks = tasks
        self.store = store
        self.sender = sender

    def show(self, principal: Principal, task_id: str) -> dict[str, Any] | None:
        """The delivery of the task's latest run that has one (None without a callback)."""
        self.tasks.get(principal, task_id)
        delivery = self.store.task_callback(task_id)
        return delivery.to_dict() if delivery else None

    def redeliver(self, principal: Principal, task_id: str) -> dict[str, Any]:
        """Make the latest delivery pending and due now, with a fresh retry window, and send it."""
        self.tasks.get(principal, task_id)
        record = self.store.redeliver_callback(task_id)
        if record is None:
            raise ConflictError(f"task {task_id!r} has no callback to deliver (it names no callback_url, or has "
                                "not ended yet)", field="task_id")
        try:
            self.sender.send_callback(record.event_id)
        except Exception as exc:  # the row is due now: a worker's scheduler sends it
            log.warning("callback.redeliver_enqueue_failed", error=type(exc).__name__)
        return record.to_dict()
