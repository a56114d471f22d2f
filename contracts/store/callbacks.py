"""Callback deliveries in the store (worker/callbacks/): one row per terminal event POSTed to a job's
callback_url, its state, when it is due next, and every try made (`attempt_log`, a JSON list)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from contracts.redaction import redact
from contracts.store.records import CallbackRecord
from contracts.store.tables import CALLBACK_DELIVERED, CALLBACK_PENDING, callbacks, now

ATTEMPT_LOG_SIZE = 50  # the tries a delivery's row remembers, newest last


class CallbackStore:
    engine: Engine

    def add_callback(self, *, event_id: str, task_id: str, run: int, tenant: str | None, url: str,
                     event: dict[str, Any]) -> bool:
        """Record a delivery due now; False when this run's delivery exists already (a redelivery)."""
        created = now()
        try:
            with self.engine.begin() as conn:
                conn.execute(callbacks.insert(), {
                    "event_id": event_id, "task_id": task_id, "run": run, "tenant": tenant, "url": url,
                    "event": event, "status": CALLBACK_PENDING, "attempts": 0, "attempt_log": [],
                    "next_attempt_at": created, "created_at": created})
        except sa.exc.IntegrityError:
            return False
        return True

    def claim_callback(self, event_id: str, lease_s: float) -> CallbackRecord | None:
        """Take a due pending delivery for one try: it is claimed for `lease_s` (longer than a try can
        take), so no other sender takes it meanwhile, a redelivery does not either (it leaves the claim
        alone), and a sender that dies leaves it due again when the claim ends. None when it is not due,
        not pending, claimed by a try in flight, or another sender won."""
        moment = now()
        until = moment + dt.timedelta(seconds=lease_s)
        with self.engine.begin() as conn:
            won = conn.execute(
                callbacks.update()
                .where(callbacks.c.event_id == event_id, callbacks.c.status == CALLBACK_PENDING,
                       callbacks.c.next_attempt_at <= moment,
                       sa.or_(callbacks.c.claimed_until.is_(None), callbacks.c.claimed_until <= moment))
                .values(next_attempt_at=until, claimed_until=until)).rowcount
        return self.get_callback(event_id) if won else None

    def record_callback_attempt(self, event_id: str, *, status: str, attempt: dict[str, Any],
                                next_attempt_at: dt.datetime | None) -> None:
        """Store one try's outcome and the delivery's new state."""
        record = self.get_callback(event_id)
        if record is None:
            return
        if attempt.get("error"):
            attempt = {**attempt, "error": redact(str(attempt["error"]))}
        values: dict[str, Any] = {
            "status": status, "attempts": record.attempts + 1, "next_attempt_at": next_attempt_at,
            "claimed_until": None,
            "last_status_code": attempt.get("status_code"), "last_error": attempt.get("error"),
            "attempt_log": [*record.attempt_log, attempt][-ATTEMPT_LOG_SIZE:]}
        if status == CALLBACK_DELIVERED:
            values["delivered_at"] = now()
        with self.engine.begin() as conn:
            conn.execute(callbacks.update().where(callbacks.c.event_id == event_id).values(**values))

    def get_callback(self, event_id: str) -> CallbackRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(callbacks.select().where(callbacks.c.event_id == event_id)).mappings().first()
        return CallbackRecord(**row) if row else None

    def task_callback(self, task_id: str) -> CallbackRecord | None:
        """The delivery of the task's latest run that has one."""
        query = callbacks.select().where(callbacks.c.task_id == task_id).order_by(callbacks.c.run.desc()).limit(1)
        with self.engine.connect() as conn:
            row = conn.execute(query).mappings().first()
        return CallbackRecord(**row) if row else None

    def due_callbacks(self, at: dt.datetime | None = None, limit: int = 500) -> list[tuple[str, dt.datetime]]:
        """(event_id, next_attempt_at) of pending deliveries due at `at`, oldest first."""
        query = (sa.select(callbacks.c.event_id, callbacks.c.next_attempt_at)
                 .where(callbacks.c.status == CALLBACK_PENDING, callbacks.c.next_attempt_at <= (at or now()))
                 .order_by(callbacks.c.next_attempt_at).limit(limit))
        with self.engine.connect() as conn:
            return [(row.event_id, row.next_attempt_at) for row in conn.execute(query)]

    def redeliver_callback(self, task_id: str) -> CallbackRecord | None:
        """Make the task's latest delivery pending and due now, with a fresh retry window. A try in
        flight keeps its claim: no second POST starts before it is recorded."""
        record = self.task_callback(task_id)
        if record is None:
            return None
        moment = now()
        with self.engine.begin() as conn:
            conn.execute(callbacks.update().where(callbacks.c.event_id == record.event_id).values(
                status=CALLBACK_PENDING, next_attempt_at=moment, created_at=moment, delivered_at=None))
        return self.get_callback(record.event_id)


