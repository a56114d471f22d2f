"""The event contract: types, Redis key names, and the shape of one event."""

from __future__ import annotations

from typing import Any

KEY_PREFIX = "qvq:task:"
CANCEL_CHANNEL = "qvq:cancel"  # carries task ids whose cancel was asked for, to every worker

QUEUED = "task.queued"
STARTED = "task.started"
IMAGES_READY = "images.ready"
REASONING_DELTA = "reasoning.delta"
ANSWER_DELTA = "answer.delta"
RETRYING = "task.retrying"
COMPLETED = "task.completed"
FAILED = "task.failed"
CANCELLED = "task.cancelled"

DELTA_TYPES = frozenset({REASONING_DELTA, ANSWER_DELTA})
TERMINAL_TYPES = frozenset({COMPLETED, FAILED, CANCELLED})


def channel(task_id: str) -> str:
    """The live pub/sub channel of a task."""
    return f"{KEY_PREFIX}{task_id}"


def log_key(task_id: str) -> str:
    """The replay stream of a task (one field, `event`, holding the event JSON)."""
    return f"{KEY_PREFIX}{task_id}:log"


def seq_key(task_id: str) -> str:
    """The counter that hands out `seq` for a task, atomically with the publish."""
    return f"{KEY_PREFIX}{task_id}:seq"


def cancel_key(task_id: str) -> str:
    """Set when a cancel was asked for; checked by the worker before and during a run."""
    return f"{KEY_PREFIX}{task_id}:cancel"


def lease_key(task_id: str) -> str:
    """Held by the worker running the task (worker/lease.py), so a redelivery never runs it twice."""
    return f"{KEY_PREFIX}{task_id}:lease"


def is_terminal(event: dict[str, Any]) -> bool:
    return event.get("type") in TERMINAL_TYPES
