"""Tasks in the store: the row a producer writes, the attempts a worker counts, the terminal claim, the
queries of the recovery sweep, conversations and listings.

The terminal write is the exactly-once claim: it only succeeds while the task is not yet terminal, and
the completed attempt's ledger row is written in the same transaction (contracts/store/usage.py). A
failed or cancelled task can be queued again (`requeue`): attempts keep counting, `retry_base`
remembers where the manual retry started so the attempt cap counts from there.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from contracts.errors import IdempotencyMismatch, TaskIdTaken
from contracts.job import JobRequest
from contracts.redaction import redact
from contracts.store.records import (
    ANY_TENANT,
    AnyTenant,
    AttemptStart,
    HistoryTurn,
    Outcome,
    TaskRecord,
    TenantScope,
)
from contracts.store.tables import CANCELLED, COMPLETED, FAILED, QUEUED, RUNNING, TERMINAL, now, tasks
from contracts.store.usage import has_usage, insert_completed_usage, task_bill, tenant_is

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

_SELECT_TASK = tasks.select().where(tasks.c.id == _P_TASK_ID)


def idempotency_scope(tenant: str | None, key: str | None) -> str | None:
    return f"{tenant or ''}/{key}" if key else None


def task_row(job: JobRequest, **extra: Any) -> dict[str, Any]:
    """The row of a task just submitted (queued, no attempt yet)."""
    return {"id": job.task_id, "status": QUEUED, "model": job.model, "tenant": job.tenant,
            "conversation_id": job.conversation_id, "idempotency_key": job.idempotency_key,
            "idempotency_scope": idempotency_scope(job.tenant, job.idempotency_key), "request": job.to_payload(),
            "attempts": 0, "retry_base": 0, "run": 0, "last_seq": 0, "created_at": now(), **extra}


class TaskStore:
    engine: Engine

    # -- producer side -------------------------------------------------------------------------
    def create_task(self, job: JobRequest) -> tuple[TaskRecord, bool]:
        """Insert the queued task; with an idempotency key this tenant already used, return that task.

        TaskIdTaken when the task id exists (whoever owns it)."""
        scope = idempotency_scope(job.tenant, job.idempotency_key)
        if scope:
            existing = self.find_by_idempotency_scope(scope)
            if existing:
                return _same_request(existing, job), False
        row = task_row(job)
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT_TASK, row)
        except sa.exc.IntegrityError:
            existing = self.find_by_idempotency_scope(scope) if scope else None
            if existing:
                return _same_request(existing, job), False
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

    def conversation_tenants(self, conversation_id: str) -> set[str | None]:
        """The tenants that have a conversation with this id (ids are scoped per tenant: each tenant's
        conversation of that id is its own; None is the no-tenant scope)."""
        query = sa.select(tasks.c.tenant).where(tasks.c.conversation_id == conversation_id).distinct()
        with self.engine.connect() as conn:
            return {row.tenant for row in conn.execute(query)}

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
                        finished_at=None, cached_from=None)
            ).rowcount
        return self.get(task_id) if moved else None

    def finish(self, task_id: str, outcome: Outcome) -> dict[str, Any] | None:
        """Write the terminal state and the bill in one transaction: the task's `cost` becomes the sum of
        every billed attempt in the ledger (usage.task_bill), its `usage` the final attempt's with the
        totals under `billed`. Returns {"cost", "usage"} as written; None when it was already terminal."""
        values: dict[str, Any] = {
            "p_task_id": task_id, "p_last_seq": outcome.last_seq,
            "status": outcome.status, "reasoning": outcome.reasoning, "answer": outcome.answer,
            "error_code": outcome.error_code,
            "error_message": redact(outcome.error_message) if outcome.error_message else outcome.error_message,
            "usage": outcome.usage, "cost": outcome.cost, "timings": outcome.timings, "finished_at": now(),
            "cached_from": outcome.cached_from,
        }
        if outcome.images is not None:
            values["images"] = outcome.images
        with self.engine.begin() as conn:
            # The claim: the SET columns are the parameters' keys; RETURNING gives what the bill needs.
            claimed = conn.execute(_FINISH, values).first()
            if claimed is None:
                return None
            if outcome.usage and outcome.cost and not has_usage(conn, task_id, outcome.attempt):
                insert_completed_usage(conn, task_id, outcome, model=claimed.model, tenant=claimed.tenant)
            bill = task_bill(conn, task_id)
            if bill is None:
                return {"cost": outcome.cost, "usage": outcome.usage}
            cost, billed = bill
            written = {"cost": cost, "usage": {**(outcome.usage or {}), "billed": billed}}
            conn.execute(tasks.update().where(tasks.c.id == task_id).values(**written))
        return written


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

    # -- the sweep (worker/recovery/sweep.py) ---------------------------------------------------------
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
            return [(row.id, row.finished_at) for row in conn.execute(query)]

    def history(self, conversation_id: str, before: dt.datetime, tenant: str | None = None) -> list[HistoryTurn]:
        """The conversation's completed turns of this tenant, oldest first: each one's question, images
        and answer (its reasoning never: the vendor keeps it out of the history)."""
        same_tenant = tasks.c.tenant.is_(None) if tenant is None else tasks.c.tenant == tenant
        query = (
            sa.select(tasks.c.request, tasks.c.answer, tasks.c.images)
            .where(tasks.c.conversation_id == conversation_id, tasks.c.status == COMPLETED,
                   tasks.c.created_at < before, same_tenant)
            .order_by(tasks.c.created_at)
        )
        with self.engine.connect() as conn:
            return [HistoryTurn(prompt=row.request["prompt"], images=tuple(row.request.get("images") or ()),
                                answer=row.answer or "", summaries=tuple(row.images or ()))
                    for row in conn.execute(query)]

    # -- reports -------------------------------------------------------------------------------
    def list_tasks(self, *, status: str | None = None, since: dt.datetime | None = None,
                   limit: int = 100, tenant: TenantScope = ANY_TENANT,
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
            query = query.where(tenant_is(tasks.c.tenant, tenant))
        if before is not None:
            created, task_id = before
            query = query.where(sa.or_(tasks.c.created_at < created,
                                       sa.and_(tasks.c.created_at == created, tasks.c.id < task_id)))
        with self.engine.connect() as conn:
            return [TaskRecord(**row) for row in conn.execute(query).mappings()]



#: The fields that make two requests the same for an idempotency key (ids, times and the key aside).
IDEMPOTENT_FIELDS = ("model", "images", "prompt", "conversation_id", "high_resolution", "callback_url", "metadata")


def _same_request(existing: TaskRecord, job: JobRequest) -> TaskRecord:
    """The task an idempotency key returned, when the new request is the same; else IdempotencyMismatch."""
    first, again = existing.request or {}, job.to_payload()
    differing = [name for name in IDEMPOTENT_FIELDS if first.get(name) != again.get(name)]
    if differing:
        raise IdempotencyMismatch(
            f"idempotency key {job.idempotency_key!r} was used for task {existing.id} with another request "
            f"(it differs in {', '.join(differing)}); use a new key for a new request", field="idempotency_key")
    return existing
