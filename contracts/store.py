"""Persistence through SQLAlchemy: one task row per job, one usage row per billed attempt.

The terminal write is the exactly-once claim: it only succeeds while the task is not yet terminal,
and the usage row is unique per (task, attempt), so a redelivered task never doubles a result or a bill.
A failed or cancelled task can be queued again (`requeue`): attempts keep counting, `retry_base`
remembers where the manual retry started so the attempt cap counts from there.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from contracts.catalog import MODELS, MONEY_PLACES, cost_decimal
from contracts.errors import RequestError
from contracts.job import JobRequest

QUEUED, RUNNING, COMPLETED, FAILED, CANCELLED = "queued", "running", "completed", "failed", "cancelled"
TERMINAL = (COMPLETED, FAILED, CANCELLED)

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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("started_at", sa.DateTime(timezone=True)),
    sa.Column("finished_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("idempotency_scope", name="uq_qvq_tasks_idempotency_scope"),
)

uploads = sa.Table(
    "qvq_uploads", metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("tenant", sa.String(128), index=True),
    sa.Column("filename", sa.String(256)),
    sa.Column("format", sa.String(16), nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False, index=True),
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
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    # the ledger (migration 0400): every billed attempt, how it ended, and the prices used
    sa.Column("run", sa.Integer, nullable=False, default=0, server_default="0"),
    sa.Column("outcome", sa.String(16)),  # completed | failed | cancelled | retried
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
    sa.Column("next_attempt_at", sa.DateTime(timezone=True), index=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("delivered_at", sa.DateTime(timezone=True)),
    sa.UniqueConstraint("task_id", "run", name="uq_qvq_callbacks_task_run"),
)
CALLBACK_PENDING, CALLBACK_DELIVERED, CALLBACK_FAILED, CALLBACK_GONE = "pending", "delivered", "failed", "gone"


# -- prebuilt statements -----------------------------------------------------------------------
# Built once and executed with parameter dicts: SQLAlchemy memoizes a statement object's cache key,
# so the hot worker path neither rebuilds the expression nor regenerates its key per call (doing so
# cost ~7% of a short task's CPU: every build made fresh type objects, whose cache keys are computed
# by introspection). Status conditions are plain comparisons, not IN (...): an IN list is an
# "expanding" parameter, rendered into the SQL string again on every execution.
_P_TASK_ID = sa.bindparam("p_task_id", type_=tasks.c.id.type)


def _status_is_one_of(statuses: tuple[str, ...]) -> sa.ColumnElement[bool]:
    return sa.or_(*(tasks.c.status == status for status in statuses))


def _build_count_attempt(statuses: tuple[str, ...]) -> sa.Update:
    return (
        tasks.update()
        .where(tasks.c.id == _P_TASK_ID, _status_is_one_of(statuses))
        .values(status=RUNNING, attempts=tasks.c.attempts + 1,
                started_at=sa.func.coalesce(tasks.c.started_at,
                                            sa.bindparam("p_now", type_=tasks.c.started_at.type)))
        .returning(tasks.c.attempts, tasks.c.retry_base)
    )


_COUNT_ATTEMPT: dict[tuple[str, ...], sa.Update] = {}


def _count_attempt_statement(statuses: tuple[str, ...]) -> sa.Update:
    statement = _COUNT_ATTEMPT.get(statuses)
    if statement is None:
        statement = _COUNT_ATTEMPT[statuses] = _build_count_attempt(statuses)
    return statement


#: The terminal claim: SET the columns named by the parameters, only while the task is not terminal.
_P_LAST_SEQ = sa.bindparam("p_last_seq", type_=tasks.c.last_seq.type)
_FINISH = (
    tasks.update()
    .where(tasks.c.id == _P_TASK_ID, *(tasks.c.status != status for status in TERMINAL))
    .values(last_seq=sa.case((tasks.c.last_seq < _P_LAST_SEQ, _P_LAST_SEQ), else_=tasks.c.last_seq))
    .returning(tasks.c.model, tasks.c.tenant)
)
_INSERT_TASK = tasks.insert()
_INSERT_USAGE = usage.insert()
_SELECT_TASK = tasks.select().where(tasks.c.id == _P_TASK_ID)


@dataclass(frozen=True)
class TaskRecord:
    id: str
    status: str
    model: str
    tenant: str | None
    conversation_id: str | None
    idempotency_key: str | None
    request: dict[str, Any]
    reasoning: str | None
    answer: str | None
    error_code: str | None
    error_message: str | None
    attempts: int
    images: list[dict[str, Any]] | None
    usage: dict[str, Any] | None
    cost: dict[str, Any] | None
    timings: dict[str, Any] | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    retry_base: int = 0  # attempts made before the last manual retry
    run: int = 0  # 0 for the first run; each manual retry starts the next one
    last_seq: int = 0  # the highest event seq the store knows of (seq never goes back)
    idempotency_scope: str | None = None  # internal: "<tenant>/<idempotency_key>"

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self.__dataclass_fields__ if name != "idempotency_scope"}
        for name in ("created_at", "started_at", "finished_at"):
            out[name] = out[name].isoformat() if out[name] else None
        out["task_id"] = out.pop("id")
        out["metadata"] = self.request.get("metadata") or {}
        out["error"] = (
            {"code": self.error_code, "message": self.error_message} if self.error_code else None
        )
        return out

    def summary(self) -> dict[str, Any]:
        """A listing's line (GET /v1/tasks, `qvq tasks`): the record without its text and request."""
        full = self.to_dict()
        return {name: full[name] for name in SUMMARY_FIELDS}


SUMMARY_FIELDS = ("task_id", "status", "model", "tenant", "conversation_id", "attempts", "error", "cost",
                  "created_at", "started_at", "finished_at")


@dataclass(frozen=True)
class AttemptStart:
    """An attempt that just began: its number, where the attempt cap counts from, and whether an
    earlier attempt was still marked running (its worker was lost, so this is a redelivery)."""

    number: int
    retry_base: int
    resumed: bool

    @property
    def since_retry(self) -> int:
        """1 for the first attempt since submit or since the last manual retry."""
        return self.number - self.retry_base


@dataclass(frozen=True)
class Outcome:
    """What a finished attempt leaves behind."""

    status: str
    attempt: int
    reasoning: str = ""
    answer: str = ""
    error_code: str | None = None
    error_message: str | None = None
    images: list[dict[str, Any]] | None = None
    usage: dict[str, Any] | None = None
    cost: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    last_seq: int = 0  # the highest seq the run published before its terminal event (never lowers the row's)


def _has_usage(conn: sa.Connection, task_id: str, attempt: int) -> bool:
    query = sa.select(usage.c.id).where(usage.c.task_id == task_id, usage.c.attempt == attempt)
    return conn.execute(query).first() is not None


def _run_of(conn: sa.Connection, task_id: str) -> int:
    return int(conn.execute(sa.select(tasks.c.run).where(tasks.c.id == task_id)).scalar() or 0)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def idempotency_scope(tenant: str | None, key: str | None) -> str | None:
    return f"{tenant or ''}/{key}" if key else None


class AnyTenant:
    """The `tenant` argument meaning: rows of every tenant."""


ANY_TENANT = AnyTenant()


def _tenant_is(column: sa.Column[Any], tenant: str | None) -> sa.ColumnElement[bool]:
    return column.is_(None) if tenant is None else column == tenant


class TaskIdTaken(RequestError):
    """The caller chose a task id that exists already (HTTP 409)."""


#: Every statement's limit, enforced by the server (PostgreSQL statement_timeout) and by the client.
DEFAULT_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5


def make_engine(url: str, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Engine:
    """An engine whose calls never hang: a connect timeout, a statement timeout, a pool timeout, and,
    for a server that stopped answering (SIGSTOPped, or a frozen network path that still ACKs), a
    client-side deadline on every checkout (`ConnectionDeadlines`). `timeout_s=None`: only the connect
    timeout (schema migrations, which may rightly take longer)."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": 30, "check_same_thread": False},
                                  pool_size=20, max_overflow=200, pool_timeout=timeout_s or 30)
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    postgres = sa.engine.make_url(url).get_backend_name() == "postgresql"
    if timeout_s is None:
        return sa.create_engine(url, pool_pre_ping=True,
                                connect_args={"connect_timeout": CONNECT_TIMEOUT_S} if postgres else {})
    connect_args: dict[str, Any] = {}
    if postgres:
        connect_args = {
            "connect_timeout": CONNECT_TIMEOUT_S,
            "options": f"-c statement_timeout={int(timeout_s * 1000)} -c lock_timeout={int(timeout_s * 1000)}",
            # a server that vanished (host down, cable cut): the kernel gives up instead of waiting for hours
            "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 3, "keepalives_count": 3,
            "tcp_user_timeout": int((timeout_s + CONNECT_TIMEOUT_S) * 1000),
        }
    engine = sa.create_engine(url, pool_size=20, max_overflow=50, pool_timeout=timeout_s, connect_args=connect_args)
    _DEADLINES.watch(engine, timeout_s + CONNECT_TIMEOUT_S)
    return engine


class ConnectionDeadlines:
    """A checked-out connection held past its deadline has its socket shut down, so the call blocked on
    it fails (OperationalError, connection invalidated) instead of waiting for a server that stopped
    answering: libpq has no client-side query timeout, and a stopped server's kernel still ACKs.

    Also the pessimistic ping (SQLAlchemy's pool_pre_ping runs before the checkout event, unguarded):
    the ping runs here, under the deadline; a dead connection is replaced by the pool."""

    def __init__(self) -> None:
        self._armed: dict[int, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def watch(self, engine: Engine, limit_s: float) -> None:
        def on_checkout(dbapi_conn: Any, _record: Any, _proxy: Any) -> None:
            self._on_checkout(dbapi_conn, limit_s)

        sa.event.listen(engine, "checkout", on_checkout)
        sa.event.listen(engine, "checkin", self._on_checkin)
        sa.event.listen(engine, "close", self._on_checkin)
        sa.event.listen(engine, "invalidate", lambda conn, *_: self._on_checkin(conn, None))

    def _on_checkout(self, dbapi_conn: Any, limit_s: float) -> None:
        self._ensure_thread()
        try:
            fd = dbapi_conn.fileno()
        except Exception as exc:
            raise sa.exc.DisconnectionError() from exc
        with self._lock:
            self._armed[id(dbapi_conn)] = (time.monotonic() + limit_s, fd)
        try:
            cursor = dbapi_conn.cursor()
            cursor.execute("SELECT 1")
            cursor.close()
        except Exception as exc:
            self._on_checkin(dbapi_conn, None)
            raise sa.exc.DisconnectionError() from exc

    def _on_checkin(self, dbapi_conn: Any, _record: Any) -> None:
        with self._lock:
            self._armed.pop(id(dbapi_conn), None)

    def _ensure_thread(self) -> None:
        if self._thread is not None and self._pid == os.getpid():
            return
        with self._lock:
            if self._thread is None or self._pid != os.getpid():  # one per process, started after a fork
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="qvq-db-deadlines", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            now_ = time.monotonic()
            with self._lock:
                late = [(key, fd) for key, (deadline, fd) in self._armed.items() if deadline <= now_]
                for key, _fd in late:
                    self._armed.pop(key, None)
            for _key, fd in late:
                _shut_down(fd)


_DEADLINES = ConnectionDeadlines()


def _shut_down(fd: int) -> None:
    """Shut the socket down under whoever is blocked on it (a dup of the descriptor, so closing ours
    leaves the owner's descriptor alone)."""
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    finally:
        sock.close()


def _aware(moment: dt.datetime) -> dt.datetime:
    """SQLite gives naive datetimes back (stored as UTC)."""
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class Store:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> Store:
        store = cls(make_engine(url, timeout_s))
        store.create_schema()
        return store

    def create_schema(self) -> None:
        """Bring the schema to the newest migration (contracts/schema.py), on an engine without the
        statement timeout: a migration may rightly take longer, or wait for another process's."""
        from contracts.schema import current_revision, head_revision, upgrade

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

    def dispose(self) -> None:
        self.engine.dispose()

    # -- producer side -------------------------------------------------------------------------
    def create_task(self, job: JobRequest) -> tuple[TaskRecord, bool]:
        """Insert the queued task; with an idempotency key this tenant already used, return that task.

        TaskIdTaken when the task id exists (whoever owns it)."""
        scope = idempotency_scope(job.tenant, job.idempotency_key)
        if scope:
            existing = self.find_by_idempotency_scope(scope)
            if existing:
                return existing, False
        row = {
            "id": job.task_id, "status": QUEUED, "model": job.model, "tenant": job.tenant,
            "conversation_id": job.conversation_id, "idempotency_key": job.idempotency_key,
            "idempotency_scope": scope, "request": job.to_payload(), "attempts": 0, "created_at": now(),
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT_TASK, row)
        except sa.exc.IntegrityError:
            existing = self.find_by_idempotency_scope(scope) if scope else None
            if existing:
                return existing, False
            if self.get(job.task_id) is not None:
                raise TaskIdTaken("a task with this id already exists; choose another (or omit it)",
                                  field="task_id") from None
            raise
        record = self.get(job.task_id)
        assert record is not None
        return record, True

    def find_by_idempotency_scope(self, scope: str) -> TaskRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(tasks.select().where(tasks.c.idempotency_scope == scope)).mappings().first()
        return TaskRecord(**row) if row else None

    def find_by_idempotency_key(self, key: str, tenant: str | None = None) -> TaskRecord | None:
        scope = idempotency_scope(tenant, key)
        return self.find_by_idempotency_scope(scope) if scope else None

    def conversation_tenant(self, conversation_id: str) -> tuple[bool, str | None]:
        """(exists, tenant of its first turn): a conversation belongs to the tenant that started it."""
        query = (sa.select(tasks.c.tenant).where(tasks.c.conversation_id == conversation_id)
                 .order_by(tasks.c.created_at, tasks.c.id).limit(1))
        with self.engine.connect() as conn:
            row = conn.execute(query).first()
        return (row is not None, row.tenant if row is not None else None)

    def get(self, task_id: str) -> TaskRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_SELECT_TASK, {"p_task_id": task_id}).mappings().first()
        return TaskRecord(**row) if row else None

    # -- worker side ---------------------------------------------------------------------------
    def start_attempt(self, task_id: str) -> int | None:
        """Mark the task running and count the attempt; None when it is terminal (never run it again)."""
        started = self._count_attempt(task_id, (QUEUED, RUNNING))
        return started[0] if started else None

    def begin_attempt(self, task_id: str) -> AttemptStart | None:
        """Like start_attempt, for a delivery that starts running a task: also tells whether the task
        was still marked running (a previous delivery's worker was lost) and the retry base."""
        # A row has one status, so the order only saves a round trip: a first delivery (queued) is
        # the common case, a resumed one (still marked running) the rare one.
        for status, resumed in ((QUEUED, False), (RUNNING, True)):
            started = self._count_attempt(task_id, (status,))
            if started:
                return AttemptStart(number=started[0], retry_base=started[1], resumed=resumed)
        return None

    def _count_attempt(self, task_id: str, statuses: tuple[str, ...]) -> tuple[int, int] | None:
        with self.engine.begin() as conn:
            result = conn.execute(_count_attempt_statement(statuses), {"p_task_id": task_id, "p_now": now()}).first()
        return (int(result[0]), int(result[1] or 0)) if result else None

    def requeue(self, task_id: str, *, statuses: tuple[str, ...] = (FAILED, CANCELLED)) -> TaskRecord | None:
        """Move a failed or cancelled task back to queued for a manual retry, atomically; None when it
        is not failed or cancelled. Attempts keep counting; the attempt cap counts from here.
        `statuses=(RUNNING,)` retries an orphan (its worker died; the caller checked its lease)."""
        with self.engine.begin() as conn:
            moved = conn.execute(
                tasks.update()
                .where(tasks.c.id == task_id, tasks.c.status.in_(statuses))
                .values(status=QUEUED, retry_base=tasks.c.attempts, run=tasks.c.run + 1, reasoning=None, answer=None,
                        error_code=None, error_message=None, usage=None, cost=None, timings=None,
                        finished_at=None)
            ).rowcount
        return self.get(task_id) if moved else None

    def finish(self, task_id: str, outcome: Outcome) -> bool:
        """Write the terminal state and the bill in one transaction; False when already terminal."""
        values: dict[str, Any] = {
            "p_task_id": task_id, "p_last_seq": outcome.last_seq,
            "status": outcome.status, "reasoning": outcome.reasoning, "answer": outcome.answer,
            "error_code": outcome.error_code, "error_message": outcome.error_message,
            "usage": outcome.usage, "cost": outcome.cost, "timings": outcome.timings, "finished_at": now(),
        }
        if outcome.images is not None:
            values["images"] = outcome.images
        with self.engine.begin() as conn:
            # The claim: the SET columns are the parameters' keys; RETURNING gives what the bill needs.
            claimed = conn.execute(_FINISH, values).first()
            if claimed is None:
                return False
            if outcome.usage and outcome.cost and not _has_usage(conn, task_id, outcome.attempt):
                self._insert_usage(conn, task_id, outcome, model=claimed.model, tenant=claimed.tenant)
        return True

    def _insert_usage(self, conn: sa.Connection, task_id: str, outcome: Outcome, *, model: str,
                      tenant: str | None) -> None:
        """The completed attempt's row, when the model-call hook (worker/flow.py) did not write it."""
        assert outcome.usage is not None and outcome.cost is not None
        prompt, completion = int(outcome.usage.get("prompt_tokens") or 0), int(outcome.usage.get("completion_tokens") or 0)
        exact = cost_decimal(model, prompt, completion) if model in MODELS else None
        conn.execute(_INSERT_USAGE, {
            "task_id": task_id, "attempt": outcome.attempt, "model": model, "tenant": tenant,
            "prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": int(outcome.usage.get("total_tokens") or 0),
            "input_cost": Decimal(str(outcome.cost["input"])), "output_cost": Decimal(str(outcome.cost["output"])),
            "total_cost": Decimal(str(outcome.cost["total"])), "created_at": now(),
            "run": _run_of(conn, task_id), "outcome": outcome.status,
            "estimated": bool(outcome.usage.get("estimated")),
            "input_price": exact["input_price"] if exact else None,
            "output_price": exact["output_price"] if exact else None,
        })

    def record_usage(self, task_id: str, attempt: int, *, model: str, tenant: str | None, prompt_tokens: int,
                     completion_tokens: int, estimated: bool, outcome: str) -> bool:
        """One ledger row for a billed attempt (failed and cancelled ones too), priced exactly;
        False when the attempt already has its row (a redelivery never bills twice)."""
        exact = cost_decimal(model, prompt_tokens, completion_tokens)
        with self.engine.begin() as conn:
            if _has_usage(conn, task_id, attempt):
                return False
            try:
                with conn.begin_nested():
                    conn.execute(_INSERT_USAGE, {
                        "task_id": task_id, "attempt": attempt, "model": model, "tenant": tenant,
                        "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                        "total_tokens": prompt_tokens + completion_tokens, "input_cost": exact["input"],
                        "output_cost": exact["output"], "total_cost": exact["total"], "created_at": now(),
                        "run": _run_of(conn, task_id), "outcome": outcome, "estimated": estimated,
                        "input_price": exact["input_price"], "output_price": exact["output_price"],
                    })
            except sa.exc.IntegrityError:  # the same attempt recorded concurrently
                return False
        return True

    def spent_since(self, tenant: str | None, since: dt.datetime) -> Decimal:
        """The tenant's ledger total (CNY) from `since` on: the truth budgets are loaded from."""
        query = sa.select(sa.func.coalesce(sa.func.sum(usage.c.total_cost), 0)).where(
            _tenant_is(usage.c.tenant, tenant), usage.c.created_at >= since)
        with self.engine.connect() as conn:
            return Decimal(str(conn.execute(query).scalar_one())).quantize(MONEY_PLACES)

    def note_seq(self, task_id: str, seq: int) -> None:
        """Remember that events up to `seq` exist (never lowers it): the floor for the next publish
        after Redis lost its counters."""
        with self.engine.begin() as conn:
            conn.execute(tasks.update().where(tasks.c.id == task_id, tasks.c.last_seq < seq).values(last_seq=seq))

    def cancel_if_queued(self, task_id: str) -> bool:
        with self.engine.begin() as conn:
            return bool(conn.execute(
                tasks.update().where(tasks.c.id == task_id, tasks.c.status == QUEUED)
                .values(status=CANCELLED, finished_at=now())
            ).rowcount)

    # -- the sweep (worker/sweep.py) -----------------------------------------------------------
    def running(self, limit: int = 10_000) -> list[tuple[str, int]]:
        """(id, run) of the tasks marked running."""
        query = sa.select(tasks.c.id, tasks.c.run).where(tasks.c.status == RUNNING).limit(limit)
        with self.engine.connect() as conn:
            return [(row.id, row.run) for row in conn.execute(query)]

    def queued_before(self, created_before: dt.datetime, *, after_id: str = "", limit: int = 500,
                      ) -> list[tuple[str, int]]:
        """(id, run) of queued tasks created before `created_before`, by id after `after_id` (a batch)."""
        query = (sa.select(tasks.c.id, tasks.c.run)
                 .where(tasks.c.status == QUEUED, tasks.c.created_at < created_before, tasks.c.id > after_id)
                 .order_by(tasks.c.id).limit(limit))
        with self.engine.connect() as conn:
            return [(row.id, row.run) for row in conn.execute(query)]

    def finished_between(self, since: dt.datetime, until: dt.datetime, *, limit: int = 500,
                         ) -> list[tuple[str, dt.datetime]]:
        """(id, finished_at) of terminal tasks that ended in [since, until), oldest first (a batch)."""
        query = (sa.select(tasks.c.id, tasks.c.finished_at)
                 .where(_status_is_one_of(TERMINAL), tasks.c.finished_at >= since, tasks.c.finished_at < until)
                 .order_by(tasks.c.finished_at).limit(limit))
        with self.engine.connect() as conn:
            return [(row.id, _aware(row.finished_at)) for row in conn.execute(query)]

    def history(self, conversation_id: str, before: dt.datetime, tenant: str | None = None) -> list[tuple[str, str]]:
        """(prompt, answer) of the conversation's completed turns of this tenant, oldest first."""
        same_tenant = tasks.c.tenant.is_(None) if tenant is None else tasks.c.tenant == tenant
        query = (
            sa.select(tasks.c.request, tasks.c.answer)
            .where(tasks.c.conversation_id == conversation_id, tasks.c.status == COMPLETED,
                   tasks.c.created_at < before, same_tenant)
            .order_by(tasks.c.created_at)
        )
        with self.engine.connect() as conn:
            return [(row.request["prompt"], row.answer or "") for row in conn.execute(query)]

    # -- reports -------------------------------------------------------------------------------
    def list_tasks(self, *, status: str | None = None, since: dt.datetime | None = None,
                   limit: int = 100, tenant: str | None | AnyTenant = ANY_TENANT,
                   before: tuple[dt.datetime, str] | None = None,
                   statuses: tuple[str, ...] = ()) -> list[TaskRecord]:
        """Newest first. `tenant` narrows to one tenant (None: the rows without one); `before` is a
        keyset cursor (created_at, id): only rows strictly after it in that order."""
        query = tasks.select().order_by(tasks.c.created_at.desc(), tasks.c.id.desc()).limit(limit)
        if status:
            query = query.where(tasks.c.status == status)
        if statuses:
            query = query.where(_status_is_one_of(statuses))
        if since:
            query = query.where(tasks.c.created_at >= since)
        if not isinstance(tenant, AnyTenant):
            query = query.where(_tenant_is(tasks.c.tenant, tenant))
        if before is not None:
            created, task_id = before
            query = query.where(sa.or_(tasks.c.created_at < created,
                                       sa.and_(tasks.c.created_at == created, tasks.c.id < task_id)))
        with self.engine.connect() as conn:
            return [TaskRecord(**row) for row in conn.execute(query).mappings()]

    def usage_rows(self, task_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(usage.select().where(usage.c.task_id == task_id).order_by(usage.c.attempt))
            return [dict(row) for row in rows.mappings()]

    def usage_summary(self, by: str = "model", *, tenant: str | None | AnyTenant = ANY_TENANT,
                      since: dt.datetime | None = None, until: dt.datetime | None = None) -> list[dict[str, Any]]:
        column = {
            "model": usage.c.model,
            "tenant": usage.c.tenant,
            "day": sa.func.date(usage.c.created_at),
        }[by]
        query = (
            sa.select(column.label(by), sa.func.count().label("calls"),
                      sa.func.sum(sa.case((usage.c.estimated, 1), else_=0)).label("estimated_calls"),
                      sa.func.sum(usage.c.prompt_tokens).label("prompt_tokens"),
                      sa.func.sum(usage.c.completion_tokens).label("completion_tokens"),
                      sa.func.sum(usage.c.total_tokens).label("total_tokens"),
                      sa.func.sum(usage.c.total_cost).label("cost_cny"))
            .group_by(column).order_by(column)
        )
        if not isinstance(tenant, AnyTenant):
            query = query.where(_tenant_is(usage.c.tenant, tenant))
        if since:
            query = query.where(usage.c.created_at >= since)
        if until:
            query = query.where(usage.c.created_at < until)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    # -- uploads -------------------------------------------------------------------------------
    def add_upload(self, upload_id: str, *, tenant: str | None, filename: str | None, format_: str,
                   size: int, ttl_s: int) -> UploadRecord:
        created = now()
        record = UploadRecord(id=upload_id, tenant=tenant, filename=filename, format=format_, bytes=size,
                              created_at=created, expires_at=created + dt.timedelta(seconds=ttl_s))
        with self.engine.begin() as conn:
            conn.execute(uploads.insert(), asdict(record))
        return record

    def get_upload(self, upload_id: str) -> UploadRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(uploads.select().where(uploads.c.id == upload_id)).mappings().first()
        return UploadRecord(**row) if row else None

    def expired_uploads(self, at: dt.datetime | None = None, limit: int = 500) -> list[UploadRecord]:
        query = uploads.select().where(uploads.c.expires_at <= (at or now())).limit(limit)
        with self.engine.connect() as conn:
            return [UploadRecord(**row) for row in conn.execute(query).mappings()]

    def delete_upload(self, upload_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(uploads.delete().where(uploads.c.id == upload_id))

    # -- callbacks (worker/deliveries.py) ------------------------------------------------------
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
        """Take a due pending delivery for one try: its next_attempt_at moves `lease_s` ahead, so
        no other sender takes it meanwhile and a sender that dies leaves it due again. None when it
        is not due, not pending, or another sender won."""
        moment = now()
        with self.engine.begin() as conn:
            won = conn.execute(
                callbacks.update()
                .where(callbacks.c.event_id == event_id, callbacks.c.status == CALLBACK_PENDING,
                       callbacks.c.next_attempt_at <= moment)
                .values(next_attempt_at=moment + dt.timedelta(seconds=lease_s))).rowcount
        return self.get_callback(event_id) if won else None

    def record_callback_attempt(self, event_id: str, *, status: str, attempt: dict[str, Any],
                                next_attempt_at: dt.datetime | None) -> None:
        """Store one try's outcome and the delivery's new state."""
        record = self.get_callback(event_id)
        if record is None:
            return
        values: dict[str, Any] = {
            "status": status, "attempts": record.attempts + 1, "next_attempt_at": next_attempt_at,
            "last_status_code": attempt.get("status_code"), "last_error": attempt.get("error"),
            "attempt_log": [*record.attempt_log, attempt][-50:]}
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
        """Make the task's latest delivery pending and due now, with a fresh retry window."""
        record = self.task_callback(task_id)
        if record is None:
            return None
        moment = now()
        with self.engine.begin() as conn:
            conn.execute(callbacks.update().where(callbacks.c.event_id == record.event_id).values(
                status=CALLBACK_PENDING, next_attempt_at=moment, created_at=moment, delivered_at=None))
        return self.get_callback(record.event_id)


@dataclass(frozen=True)
class CallbackRecord:
    event_id: str
    task_id: str
    run: int
    tenant: str | None
    url: str
    event: dict[str, Any]
    status: str
    attempts: int
    last_status_code: int | None
    last_error: str | None
    attempt_log: list[dict[str, Any]]
    next_attempt_at: dt.datetime | None
    created_at: dt.datetime
    delivered_at: dt.datetime | None

    def to_dict(self) -> dict[str, Any]:
        """What GET /v1/tasks/{id} shows as `callback` (the URL without its query: it may hold a token)."""
        def iso(moment: dt.datetime | None) -> str | None:
            return moment.isoformat() if moment else None

        return {"event_id": self.event_id, "run": self.run, "url": self.url.split("?", 1)[0],
                "status": self.status, "attempts": self.attempts, "last_status_code": self.last_status_code,
                "last_error": self.last_error, "next_attempt_at": iso(self.next_attempt_at) if self.status == CALLBACK_PENDING else None,
                "created_at": iso(self.created_at), "delivered_at": iso(self.delivered_at),
                "attempt_log": self.attempt_log}


@dataclass(frozen=True)
class UploadRecord:
    id: str
    tenant: str | None
    filename: str | None
    format: str
    bytes: int
    created_at: dt.datetime
    expires_at: dt.datetime

    @property
    def ref(self) -> str:
        return f"upload://{self.id}"

    def is_live(self, at: dt.datetime | None = None) -> bool:
        expires = self.expires_at if self.expires_at.tzinfo else self.expires_at.replace(tzinfo=dt.UTC)
        return expires > (at or now())
