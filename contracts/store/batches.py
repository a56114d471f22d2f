"""Batches in the store: the batch row, its items (tasks with `batch_id` and `batch_item`), their counts and
spend, and the completion claim.

Items are inserted a page at a time, each with an idempotency key made of the batch id and the object's
version, so a repeated submit of the same batch inserts only what is new. Item numbers are handed out by
one atomic counter on the batch row; they give the batch its stable order (results, listings).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine

from contracts.catalog import MONEY_PLACES
from contracts.store.records import TaskRecord, iso
from contracts.store.tables import CANCELLED, QUEUED, RUNNING, TERMINAL, batches, now, tasks, usage

OPEN_STATUSES = (QUEUED, RUNNING)


@dataclass(frozen=True)
class BatchRecord:
    id: str
    tenant: str | None
    request: dict[str, Any]
    items: int  # item numbers handed out (an upper bound of the items: a repeated item takes none)
    listed: bool  # every item was added
    estimate: dict[str, Any] | None
    round: int  # 0, then one more per retry of the failed items
    created_at: dt.datetime
    completed_at: dt.datetime | None
    cancelled_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        return {"batch_id": self.id, "tenant": self.tenant, "listed": self.listed, "estimate": self.estimate,
                "round": self.round, "created_at": iso(self.created_at), "completed_at": iso(self.completed_at),
                "cancelled_at": iso(self.cancelled_at), **{name: self.request.get(name) for name in SHOWN_REQUEST}}


#: The request fields a batch's JSON shows (the callback URL stays out: it may hold a token).
SHOWN_REQUEST = ("source", "suffix", "prompt", "model", "high_resolution", "max_cost_cny", "cache")


@dataclass(frozen=True)
class BatchTally:
    """A batch's items now: how many of each status, and the ledger's tokens and cost so far."""

    counts: dict[str, int]
    tokens: int
    cost: Decimal

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(self.counts.get(status, 0) for status in TERMINAL)

    @property
    def open(self) -> int:
        return sum(self.counts.get(status, 0) for status in OPEN_STATUSES)


def _insert_ignoring_duplicates(dialect: str) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING RETURNING id, in the database's own words."""
    module: Any = postgresql if dialect == "postgresql" else sqlite
    return module.insert(tasks).on_conflict_do_nothing().returning(tasks.c.id)


class BatchStore:
    engine: Engine

    def create_batch(self, batch_id: str, tenant: str | None, request: dict[str, Any],
                     estimate: dict[str, Any] | None) -> tuple[BatchRecord, bool]:
        """Insert the batch; when it exists, return it (created False): the caller checks it is the same."""
        row = {"id": batch_id, "tenant": tenant, "request": request, "items": 0, "listed": False,
               "estimate": estimate, "round": 0, "created_at": now()}
        try:
            with self.engine.begin() as conn:
                conn.execute(batches.insert(), row)
            created = True
        except sa.exc.IntegrityError:
            created = False
        record = self.get_batch(batch_id)
        assert record is not None
        return record, created

    def get_batch(self, batch_id: str) -> BatchRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(batches.select().where(batches.c.id == batch_id)).mappings().first()
        return BatchRecord(**row) if row else None

    def add_items(self, batch_id: str, rows: Sequence[dict[str, Any]]) -> list[str]:
        """Insert a page of item rows (tasks), numbering them after the batch's last; returns the ids of
        the rows inserted (an item whose idempotency key exists already is skipped)."""
        if not rows:
            return []
        with self.engine.begin() as conn:
            last = conn.execute(batches.update().where(batches.c.id == batch_id)
                                .values(items=batches.c["items"] + len(rows)).returning(batches.c["items"])).scalar_one()
            numbered = [{**row, "batch_id": batch_id, "batch_item": last - len(rows) + index}
                        for index, row in enumerate(rows)]
            statement = _insert_ignoring_duplicates(self.engine.dialect.name)
            return [row.id for row in conn.execute(statement, numbered)]

    def finish_listing(self, batch_id: str, estimate: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {"listed": True}
        if estimate is not None:
            values["estimate"] = estimate
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id).values(**values))

    def tally(self, batch_id: str) -> BatchTally:
        counted = (sa.select(tasks.c.status, sa.func.count()).where(tasks.c.batch_id == batch_id)
                   .group_by(tasks.c.status))
        spent = (sa.select(sa.func.coalesce(sa.func.sum(usage.c.total_tokens), 0),
                           sa.func.coalesce(sa.func.sum(usage.c.total_cost), 0))
                 .select_from(usage.join(tasks, usage.c.task_id == tasks.c.id)).where(tasks.c.batch_id == batch_id))
        with self.engine.connect() as conn:
            counts = {row[0]: int(row[1]) for row in conn.execute(counted)}
            tokens, cost = conn.execute(spent).one()
        return BatchTally(counts, int(tokens), Decimal(str(cost)).quantize(MONEY_PLACES))

    def batch_spent(self, batch_id: str) -> Decimal:
        """The batch's ledger total (CNY): every billed attempt of its items."""
        spent = (sa.select(sa.func.coalesce(sa.func.sum(usage.c.total_cost), 0))
                 .select_from(usage.join(tasks, usage.c.task_id == tasks.c.id)).where(tasks.c.batch_id == batch_id))
        with self.engine.connect() as conn:
            return Decimal(str(conn.execute(spent).scalar_one())).quantize(MONEY_PLACES)

    def batch_items(self, batch_id: str, *, after: int = -1, limit: int = 500,
                    statuses: tuple[str, ...] = ()) -> list[TaskRecord]:
        """A page of the batch's items in their stable order, after item number `after`."""
        query = (tasks.select().where(tasks.c.batch_id == batch_id, tasks.c.batch_item > after)
                 .order_by(tasks.c.batch_item).limit(limit))
        if statuses:
            query = query.where(tasks.c.status.in_(statuses))
        with self.engine.connect() as conn:
            return [TaskRecord(**row) for row in conn.execute(query).mappings()]

    def cancel_queued_items(self, batch_id: str) -> list[tuple[str, int, int]]:
        """Cancel every queued item at once: (id, attempts, last_seq) of each one cancelled here."""
        with self.engine.begin() as conn:
            rows = conn.execute(tasks.update().where(tasks.c.batch_id == batch_id, tasks.c.status == QUEUED)
                                .values(status=CANCELLED, finished_at=now())
                                .returning(tasks.c.id, tasks.c.attempts, tasks.c.last_seq)).all()
        return [(row.id, int(row.attempts), int(row.last_seq)) for row in rows]

    def claim_completion(self, batch_id: str) -> bool:
        """Mark the batch completed, once per round: only when its listing is done and no item is queued
        or running. True for the one caller that claimed it."""
        still_open = sa.exists().where(tasks.c.batch_id == batch_id, tasks.c.status.in_(OPEN_STATUSES))
        with self.engine.begin() as conn:
            return bool(conn.execute(
                batches.update().where(batches.c.id == batch_id, batches.c.listed.is_(True),
                                       batches.c.completed_at.is_(None), ~still_open)
                .values(completed_at=now())).rowcount)

    def start_round(self, batch_id: str) -> None:
        """A retry of the failed items: the batch is open again, and completes (and calls back) anew."""
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id)
                         .values(round=batches.c.round + 1, completed_at=None, cancelled_at=None))

    def mark_cancelled(self, batch_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(batches.update().where(batches.c.id == batch_id, batches.c.cancelled_at.is_(None))
                         .values(cancelled_at=now()))
