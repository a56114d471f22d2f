"""Persistence through SQLAlchemy: what lives here and what each module holds.

    tables.py     the tables, the statuses, and UtcDateTime (every time read back zone-aware)
    engine.py     engines whose calls never hang (connect, statement, pool and client-side deadlines)
    records.py    what the store hands out: TaskRecord, Outcome, AttemptStart, CallbackRecord, UploadRecord
    tasks.py      tasks: submit, attempts, the terminal claim, the sweep's queries, conversations, listings
    usage.py      the usage ledger (one row per billed attempt) and the usage report
    callbacks.py  callback deliveries
    batches.py    batches: the batch row, its items, their tally, the completion claim
    uploads.py    uploads
    schema.py     the schema's version: Alembic migrations (migrations/), applied at start

`Store` is all of them over one engine. Modules here import only the contracts' leaves (job, catalog,
errors), never the producer or the worker.
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from contracts.store.batches import BatchRecord, BatchStore, BatchTally
from contracts.store.callbacks import CallbackStore
from contracts.store.engine import DEFAULT_TIMEOUT_S, make_engine
from contracts.store.records import (
    ANY_TENANT,
    AnyTenant,
    AttemptStart,
    CallbackRecord,
    HistoryTurn,
    Outcome,
    TaskRecord,
    TenantScope,
    UploadRecord,
    iso,
)
from contracts.store.schema import current_revision, head_revision, upgrade
from contracts.store.tables import (
    CALLBACK_DELIVERED,
    CALLBACK_FAILED,
    CALLBACK_GONE,
    CALLBACK_PENDING,
    CANCELLED,
    COMPLETED,
    FAILED,
    QUEUED,
    RUNNING,
    TERMINAL,
    metadata,
)
from contracts.store.tasks import TaskStore, idempotency_scope, task_row
from contracts.store.uploads import UploadStore
from contracts.store.usage import UsageStore, usage_report

__all__ = [
    "ANY_TENANT", "BatchRecord", "BatchTally", "CALLBACK_DELIVERED", "CALLBACK_FAILED", "CALLBACK_GONE", "CALLBACK_PENDING", "CANCELLED",
    "COMPLETED", "FAILED", "QUEUED", "RUNNING", "TERMINAL", "AnyTenant", "AttemptStart", "CallbackRecord",
    "HistoryTurn", "Outcome", "Store", "TaskRecord", "TenantScope", "UploadRecord", "idempotency_scope", "iso", "task_row", "make_engine",
    "metadata", "usage_report",
]


class Store(TaskStore, UsageStore, CallbackStore, UploadStore, BatchStore):
    """The store of one process: tasks, the usage ledger, callback deliveries, uploads and batches, one engine."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, migrate: bool = True) -> Store:
        """A store on `url`, its schema brought to the newest migration first. `migrate=False` (a reading
        command): nothing is created or changed, and nothing is connected before the first query; a
        database without the tables then fails that query (`is_missing_schema` tells)."""
        store = cls(make_engine(url, timeout_s))
        if migrate:
            store.create_schema()
        return store

    def create_schema(self) -> None:
        """Bring the schema to the newest migration (schema.py), on an engine without the statement
        timeout: a migration may rightly take longer, or wait for another process's."""
        with self.engine.connect() as conn:
            if current_revision(conn) == head_revision():
                return
        if self.engine.url.get_backend_name() == "sqlite":
            upgrade(self.engine)
            return
        migrator = make_engine(self.engine.url.render_as_string(hide_password=False), timeout_s=None)
        try:
            upgrade(migrator)
        finally:
            migrator.dispose()

    @staticmethod
    def is_missing_schema(exc: BaseException) -> bool:
        """Whether a database error says the tables are not there (SQLite, PostgreSQL)."""
        text = str(getattr(exc, "orig", None) or exc)
        return "no such table" in text or ("relation" in text and "does not exist" in text)

    def dispose(self) -> None:
        self.engine.dispose()
