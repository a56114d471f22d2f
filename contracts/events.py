"""The event types, named once: the worker publishes them, every viewer (the Python clients, `qvq follow`,
the SSE endpoint, the web viewer, whose page gets this list from the API) reads them by these names.

Each event is one JSON object: `task_id`, `seq`, `type`, `ts`, `attempt`, plus the fields of its type
(README, Events). Redis key names are in contracts/keys.py.
"""

from __future__ import annotations

from typing import Any

QUEUED = "task.queued"
STARTED = "task.started"
IMAGES_READY = "images.ready"
REASONING_DELTA = "reasoning.delta"
ANSWER_DELTA = "answer.delta"
RETRYING = "task.retrying"
WAITING = "task.waiting"  # {reason, wait_s}: held back by flow control, not failed
COMPLETED = "task.completed"
FAILED = "task.failed"
CANCELLED = "task.cancelled"
STREAM_GAP = "stream.gap"  # {from_seq, to_seq}: never published; a follower's word that events are missing

#: Every type, in the order a task's events come.
EVENT_TYPES = (QUEUED, STARTED, IMAGES_READY, WAITING, REASONING_DELTA, ANSWER_DELTA, RETRYING, COMPLETED,
               FAILED, CANCELLED, STREAM_GAP)
DELTA_TYPES = frozenset({REASONING_DELTA, ANSWER_DELTA})
TERMINAL_TYPES = frozenset({COMPLETED, FAILED, CANCELLED})
#: Why flow control holds a task back (task.waiting's `reason`).
WAIT_REASONS = ("model_quota", "tenant_concurrency", "tenant_rate", "identical_job")
IDENTICAL_JOB = "identical_job"  # waiting for an identical job's answer (the result cache's single flight)
#: The terminal event of each terminal status, and back.
EVENT_OF_STATUS = {"completed": COMPLETED, "failed": FAILED, "cancelled": CANCELLED}


# -- a batch's events (on qvq:batch:{id}; `batch_id`, `seq`, `type`, `ts`, `round` and the tally) ------------
BATCH_PROGRESS = "batch.progress"  # items, counts by status, done, tokens, cost, rate, eta_s: a few a second at most
BATCH_COMPLETED = "batch.completed"  # the same, once per round, when no item is queued or running
BATCH_EVENT_TYPES = (BATCH_PROGRESS, BATCH_COMPLETED)


def is_terminal(event: dict[str, Any]) -> bool:
    return event.get("type") in TERMINAL_TYPES
