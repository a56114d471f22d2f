"""The tables (and the one column type for times) of the store; schema changes go through migrations/."""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
TERMINAL = (COMPLETED, FAILED, CANCELLED)
CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_GONE = "pending", "delivered", "failed", "gone"


class UtcDateTime(sa.TypeDecorator[dt.datetime]):
    """A point in time, stored in UTC and always read back zone-aware (SQLite keeps no zone: its naive
    values are UTC). The one place the store turns naive times into aware ones."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


metadata = sa.MetaData()

tasks = sa.Table(
    "qvq_tasks", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("status", sa.String(16), nullable=False, index=True),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(128), index=True),
    sa.Column("conversation_id", sa.String(128), index=True),
    sa.Column("idempotency_key", sa.String(256), index=True),
    sa.Column("idempotency_scope", sa.String(400)),  # "<tenant>/<key>": idempotency keys are per tenant
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("reasoning", sa.Text),
    sa.Column("answer", sa.Text),
    sa.Column("error_code", sa.String(64)),
    sa.Column("error_message", sa.Text),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("retry_base", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("run", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("last_seq", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("images", sa.JSON),
    sa.Column("usage", sa.JSON),
    sa.Column("cost", sa.JSON),
    sa.Column("timings", sa.JSON),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("started_at", UtcDateTime()),
    sa.Column("finished_at", UtcDateTime()),
    # migration 0008: the batch an item belongs to and its place in it; the task a cached answer came from
    sa.Column("batch_id", sa.String(128)),
    sa.Column("batch_item", sa.Integer),
    sa.Column("cached_from", sa.String(128)),
    sa.UniqueConstraint("idempotency_scope", name="uq_qvq_tasks_idempotency_scope"),
    sa.Index("ix_qvq_tasks_batch_item", "batch_id", "batch_item"),
    sa.Index("ix_qvq_tasks_batch_status", "batch_id", "status"),  # a batch's counts, its open items
)

#: One row per batch (contracts/store/batches.py): its request, how many item numbers were handed out,
#: whether the listing is done, its estimate, and its completion (claimed once per round: a retry of
#: its failed items starts the next round).
batches = sa.Table(
    "qvq_batches", metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("tenant", sa.String(128), index=True),
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("items", sa.Integer, nullable=False, default=0),
    sa.Column("listed", sa.Boolean, nullable=False, default=False),
    sa.Column("estimate", sa.JSON),
    sa.Column("round", sa.Integer, nullable=False, default=0),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("completed_at", UtcDateTime()),
    sa.Column("cancelled_at", UtcDateTime()),
)

uploads = sa.Table(
    "qvq_uploads", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(128), index=True),
    sa.Column("filename", sa.String(256)),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("expires_at", UtcDateTime(), nullable=False, index=True),
)

usage = sa.Table(
    "qvq_usage", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task_id", sa.String(128), sa.ForeignKey("qvq_tasks.id"), nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("model", sa.String(64), nullable=False),
    sa.Column("tenant", sa.String(128)),
    sa.Column("prompt_tokens", sa.Integer, nullable=False),
    sa.Column("completion_tokens", sa.Integer, nullable=False),
    sa.Column("total_tokens", sa.Integer, nullable=False),
    sa.Column("input_cost", sa.Numeric(18, 6), nullable=False),
    sa.Column("output_cost", sa.Numeric(18, 6), nullable=False),
    sa.Column("total_cost", sa.Numeric(18, 6), nullable=False),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    # the ledger (migration 0400): every billed attempt, how it ended, and the prices used
    sa.Column("run", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("outcome", sa.String(16)),  # completed | failed | cancelled | retried | cached
    sa.Column("estimated", sa.Boolean, nullable=False, default=False, server_default=sa.false()),
    sa.Column("input_price", sa.Numeric(18, 6)),  # CNY per 1,000 tokens
    sa.Column("output_price", sa.Numeric(18, 6)),
    sa.UniqueConstraint("task_id", "attempt", name="uq_qvq_usage_task_attempt"),
    sa.Index("ix_qvq_usage_tenant_created_at", "tenant", "created_at"),
)

#: One row per terminal event POSTed to a job's callback_url (worker/deliveries.py): the delivery's
#: state, when it is due next, and every try made (`attempt_log`, a JSON list).
callbacks = sa.Table(
    "qvq_callbacks", metadata,
    sa.Column("event_id", sa.String(200), primary_key=True),  # "<task_id>:<run>:<seq>"
    sa.Column("task_id", sa.String(128), nullable=False, index=True),
    sa.Column("run", sa.Integer, nullable=False),
    sa.Column("tenant", sa.String(128)),
    sa.Column("url", sa.Text, nullable=False),
    sa.Column("event", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),  # pending, delivered, failed, gone
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("last_status_code", sa.Integer),
    sa.Column("last_error", sa.Text),
    sa.Column("attempt_log", sa.JSON, nullable=False),
    sa.Column("next_attempt_at", UtcDateTime(), index=True),
    sa.Column("created_at", UtcDateTime(), nullable=False),
    sa.Column("delivered_at", UtcDateTime()),
    sa.Column("claimed_until", UtcDateTime()),  # a try is in flight until then (single flight)
    sa.UniqueConstraint("task_id", "run", name="uq_qvq_callbacks_task_run"),
)

