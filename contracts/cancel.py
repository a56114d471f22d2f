"""Cancelling a task: the one path every cancel takes (`qvq cancel`, POST /v1/tasks/{id}/cancel, a Celery
revoke), so each publishes the same task.cancelled, above the same seq floor.

- queued: the row becomes cancelled at once and task.cancelled is published;
- running: the cancel flag is set (a worker checks it before and during a run) and the id goes out on the
  cancel channel, so the worker running it closes its stream; the worker writes the end;
- running, but nobody holds its lease (its worker died): cancelled at once, like a queued task.
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import redis
import sqlalchemy as sa

from contracts import events as ev
from contracts import keys
from contracts.store import CANCELLED, RUNNING, Outcome, Store, TaskRecord

CANCEL_TTL_S = 86_400  # the cancel flag outlives any queue wait the task may still have


class Publisher(Protocol):
    def publish(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0, **fields: Any) -> int: ...


def cancel_task(record: TaskRecord, *, store: Store, client: redis.Redis, bus: Publisher) -> bool:
    """Ask the task to stop; False when it had already ended."""
    if record.is_terminal:
        return False
    client.set(keys.cancel_key(record.id), "1", ex=CANCEL_TTL_S)
    ended_here = store.cancel_if_queued(record.id) or (
        record.status == RUNNING and is_orphaned(client, record.id)
        and store.finish(record.id, Outcome(status=CANCELLED, attempt=record.attempts)))
    if ended_here:
        seq = bus.publish(record.id, ev.CANCELLED, record.attempts, seq_floor=record.last_seq)
        with contextlib.suppress(sa.exc.SQLAlchemyError):  # only the floor after Redis lost its counters
            store.note_seq(record.id, seq)
    if not ended_here or record.status == RUNNING:  # a live worker may still hold it (Redis lost its lease)
        client.publish(keys.CANCEL_CHANNEL, record.id)
    return True


def is_orphaned(client: redis.Redis, task_id: str) -> bool:
    """A running task whose worker died: nobody holds its lease."""
    return not client.exists(keys.lease_key(task_id))
