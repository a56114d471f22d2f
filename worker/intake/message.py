"""The queue message: which task, and which run of it, to execute. The request itself is read from the
task row, so a message can never make the worker run other images or another prompt than the row holds.

    {"version": 2, "task_id": "...", "run": 0}

A message is refused (logged loudly, counted, acknowledged, never run) when its task has no row, when
its run is not the row's run, or when it is an old-format message (version 1, the full request) that
differs from the row. Old-format messages that match the row run normally (a rolling upgrade).
"""

from __future__ import annotations

import itertools
from typing import Any, Protocol

from contracts.job import MESSAGE_VERSION, PAYLOAD_VERSION
from contracts.logging import get_logger
from contracts.store import TaskRecord

log = get_logger(__name__)

_rejected = itertools.count(1)


class RecordSource(Protocol):
    def get(self, task_id: str) -> TaskRecord | None: ...


def load_record(message: Any, store: RecordSource, *, delivery_id: str | None = None) -> TaskRecord | None:
    """The task row the message names (the job is its `request`); None (and a loud log line) when refused.

    Database errors propagate (the caller puts the message back for later)."""
    task_id = message.get("task_id") if isinstance(message, dict) else None
    record = None
    if not isinstance(task_id, str) or not task_id:
        problem: str | None = "the message names no task"
    elif delivery_id is not None and delivery_id != task_id:
        problem = f"the message was delivered as task {delivery_id!r}"
    else:
        record = store.get(task_id)
        problem = "no task row" if record is None else _mismatch(message, record)
    if problem or record is None:
        log.error("task.message_rejected", task_id=task_id, reason=problem, rejected_total=next(_rejected))
        return None
    return record


def _mismatch(message: dict[str, Any], record: TaskRecord) -> str | None:
    version = message.get("version")
    if version == MESSAGE_VERSION:
        run = message.get("run")
        if run != record.run:
            return f"the message is for run {run!r}, the task is at run {record.run}"
        return None
    if version == PAYLOAD_VERSION:
        if message != record.request:
            return "an old-format message whose request differs from the task row"
        return None
    return f"unsupported message version {version!r}"
