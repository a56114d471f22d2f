"""The usage ledger: one row per billed attempt (task, attempt), priced exactly, whatever the attempt's
outcome; and the usage report (`GET /v1/usage`, `qvq usage`), computed here once.

A row is unique per (task, attempt), so a redelivered task never bills twice.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from contracts.catalog import MODELS, MONEY_FIELDS, MONEY_PLACES, cost_decimal, money_text
from contracts.store.records import ANY_TENANT, AnyTenant, Outcome, TenantScope
from contracts.store.tables import now, tasks, usage

_INSERT_USAGE = usage.insert()
#: The report's counted columns (summed per group and in the total); cost_cny follows them.
CACHED = "cached"  # the ledger outcome of an answer taken from the result cache (cost 0)
USAGE_COUNTS = ("calls", "estimated_calls", "prompt_tokens", "completion_tokens", "total_tokens")


def has_usage(conn: sa.Connection, task_id: str, attempt: int) -> bool:
    query = sa.select(usage.c.id).where(usage.c.task_id == task_id, usage.c.attempt == attempt)
    return conn.execute(query).first() is not None


def tenant_is(column: sa.Column[Any], tenant: str | None) -> sa.ColumnElement[bool]:
    return column.is_(None) if tenant is None else column == tenant


def _ledger_row(conn: sa.Connection, task_id: str, attempt: int, *, model: str, tenant: str | None,
                prompt: int, completion: int, total: int, costs: dict[str, Decimal], outcome: str,
                estimated: bool) -> dict[str, Any]:
    exact = cost_decimal(model, prompt, completion) if model in MODELS else None
    return {
        "task_id": task_id, "attempt": attempt, "model": model, "tenant": tenant, "prompt_tokens": prompt,
        "completion_tokens": completion, "total_tokens": total, "input_cost": costs["input"],
        "output_cost": costs["output"], "total_cost": costs["total"], "created_at": now(),
        "run": int(conn.execute(sa.select(tasks.c.run).where(tasks.c.id == task_id)).scalar() or 0),
        "outcome": outcome, "estimated": estimated,
        "input_price": exact["input_price"] if exact else None,
        "output_price": exact["output_price"] if exact else None,
    }


def insert_completed_usage(conn: sa.Connection, task_id: str, outcome: Outcome, *, model: str,
                           tenant: str | None) -> None:
    """The completed attempt's row, in the terminal write's transaction, when the model-call hook
    (worker/flow/control.py) did not write it."""
    assert outcome.usage is not None and outcome.cost is not None
    if outcome.cached_from is not None:  # a cached answer: no call was made, nothing is billed
        zero = {name: Decimal(0) for name in MONEY_FIELDS}
        conn.execute(_INSERT_USAGE, _ledger_row(conn, task_id, outcome.attempt, model=model, tenant=tenant, prompt=0,
                                                completion=0, total=0, costs=zero, outcome=CACHED, estimated=False))
        return
    costs = {name: Decimal(str(outcome.cost[name])) for name in MONEY_FIELDS}
    conn.execute(_INSERT_USAGE, _ledger_row(
        conn, task_id, outcome.attempt, model=model, tenant=tenant,
        prompt=int(outcome.usage.get("prompt_tokens") or 0), completion=int(outcome.usage.get("completion_tokens") or 0),
        total=int(outcome.usage.get("total_tokens") or 0), costs=costs, outcome=outcome.status,
        estimated=bool(outcome.usage.get("estimated"))))


def task_bill(conn: sa.Connection, task_id: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """The task's bill from the ledger: every billed attempt (all runs), summed. (cost, billed usage) as
    JSON carries them, or None when nothing was billed.

    cost  = {input, output, total, currency, attempts: [{attempt, run, outcome, prompt_tokens,
             completion_tokens, total_tokens, estimated, cost}]}
    usage = {prompt_tokens, completion_tokens, total_tokens, attempts}: the totals, apart from the final
            attempt's own usage (the task's `usage` keeps that, with these under `billed`)."""
    rows = conn.execute(usage.select().where(usage.c.task_id == task_id).order_by(usage.c.attempt)).mappings().all()
    if not rows:
        return None
    attempts = [{"attempt": row["attempt"], "run": row["run"], "outcome": row["outcome"],
                 "prompt_tokens": row["prompt_tokens"], "completion_tokens": row["completion_tokens"],
                 "total_tokens": row["total_tokens"], "estimated": bool(row["estimated"]),
                 "cost": money_text(row["total_cost"])} for row in rows]
    sums = {name: sum((Decimal(str(row[f"{name}_cost"])) for row in rows), Decimal(0)) for name in MONEY_FIELDS}
    cost = {**{name: money_text(sums[name]) for name in MONEY_FIELDS}, "currency": "CNY", "attempts": attempts}
    billed = {name: sum(int(row[name]) for row in rows) for name in ("prompt_tokens", "completion_tokens",
                                                                      "total_tokens")}
    return cost, {**billed, "attempts": len(rows)}


def usage_report(by: str, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """{"rows": [...], "total": {...}}: the groups and their sum, money as exact decimal strings."""
    out: list[dict[str, Any]] = [
        {by: None if row[by] is None else str(row[by]), **{name: int(row.get(name) or 0) for name in USAGE_COUNTS},
         "cost_cny": str(Decimal(row["cost_cny"] or 0))} for row in rows]
    total: dict[str, Any] = {name: sum(r[name] for r in out) for name in USAGE_COUNTS}
    total["cost_cny"] = str(sum((Decimal(r["cost_cny"]) for r in out), Decimal(0)))
    return {"rows": out, "total": total}


class UsageStore:
    engine: Engine

    def record_usage(self, task_id: str, attempt: int, *, model: str, tenant: str | None, prompt_tokens: int,
                     completion_tokens: int, estimated: bool, outcome: str) -> bool:
        """One ledger row for a billed attempt (failed and cancelled ones too), priced exactly;
        False when the attempt already has its row (a redelivery never bills twice)."""
        exact = cost_decimal(model, prompt_tokens, completion_tokens)
        # The reads go first, in a transaction of their own: on SQLite a transaction that reads and then
        # writes fails at once ("database is locked") when another writer came in between, where one that
        # starts by writing waits its turn (the busy timeout).
        with self.engine.connect() as conn:
            if has_usage(conn, task_id, attempt):
                return False
            row = _ledger_row(conn, task_id, attempt, model=model, tenant=tenant, prompt=prompt_tokens,
                              completion=completion_tokens, total=prompt_tokens + completion_tokens, costs=exact,
                              outcome=outcome, estimated=estimated)
        try:
            with self.engine.begin() as conn:
                conn.execute(_INSERT_USAGE, row)
        except sa.exc.IntegrityError:  # the same attempt recorded concurrently
            return False
        return True

    def spent_since(self, tenant: str | None, since: dt.datetime) -> Decimal:
        """The tenant's ledger total (CNY) from `since` on: the truth budgets are loaded from."""
        query = sa.select(sa.func.coalesce(sa.func.sum(usage.c.total_cost), 0)).where(
            tenant_is(usage.c.tenant, tenant), usage.c.created_at >= since)
        with self.engine.connect() as conn:
            return Decimal(str(conn.execute(query).scalar_one())).quantize(MONEY_PLACES)

    def usage_rows(self, task_id: str) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(usage.select().where(usage.c.task_id == task_id).order_by(usage.c.attempt))
            return [dict(row) for row in rows.mappings()]

    def usage_summary(self, by: str = "model", *, tenant: TenantScope = ANY_TENANT,
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
            query = query.where(tenant_is(usage.c.tenant, tenant))
        if since:
            query = query.where(usage.c.created_at >= since)
        if until:
            query = query.where(usage.c.created_at < until)
        with self.engine.connect() as conn:
            return [dict(row) for row in conn.execute(query).mappings()]

    def usage_report(self, by: str = "model", *, tenant: TenantScope = ANY_TENANT,
                     since: dt.datetime | None = None, until: dt.datetime | None = None) -> dict[str, Any]:
        """The usage report: per group (model, tenant or UTC day) and in total."""
        return usage_report(by, self.usage_summary(by, tenant=tenant, since=since, until=until))
