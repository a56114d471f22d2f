"""An item of a batch, as the worker sees it: before it runs, its batch may stop it (cancelled: the item is
cancelled; `max_cost_cny` spent: the item fails with budget.exceeded, nothing called); after it ends, the
batch's progress and completion (contracts/batches/progress.py)."""

from __future__ import annotations

import time
from decimal import Decimal

from contracts.batches import progress
from contracts.catalog import money_text
from contracts.errors import BudgetError, StreamStopped
from contracts.job import JobRequest
from worker.context import WorkerContext
from worker.persist import store_call
from worker.recovery.cancel import RunWatch

SPENT_FRESH_S = 1.0  # how stale a batch's spend may be when an item starts (the cap may be passed by this much)
MAX_BATCHES_KNOWN = 1000
_SPENT: dict[str, tuple[float, Decimal]] = {}  # batch id -> (fresh until, spent)


def admit_item(ctx: WorkerContext, job: JobRequest, watch: RunWatch) -> None:
    """Whether the item may run now: StreamStopped (cancelled) when its batch was cancelled, BudgetError
    when the batch's `max_cost_cny` is spent. Items already calling the model finish: the cap can be
    passed by what is in flight at the moment it is reached, and by the items started within SPENT_FRESH_S."""
    if job.batch_id is None:
        return
    batch = store_call(ctx.store.get_batch, job.batch_id)
    if batch is None:
        return
    if batch.cancelled_at is not None:
        watch.cancelled = True
        raise StreamStopped(None)
    cap = batch.request.get("max_cost_cny")
    if cap is None:
        return
    spent = _spent(ctx, job.batch_id)
    if spent >= Decimal(cap):
        raise BudgetError(f"batch {job.batch_id} has spent {money_text(spent)} CNY of its max_cost_cny "
                          f"{money_text(cap)}; this item was not run")


def _spent(ctx: WorkerContext, batch_id: str) -> Decimal:
    """The batch's ledger total, read at most every SPENT_FRESH_S per batch by this process (each item start
    reading it would sum the batch's ledger once per item)."""
    now = time.monotonic()
    known = _SPENT.get(batch_id)
    if known is not None and known[0] > now:
        return known[1]
    spent: Decimal = store_call(ctx.store.batch_spent, batch_id)
    if len(_SPENT) >= MAX_BATCHES_KNOWN:
        _SPENT.clear()
    _SPENT[batch_id] = (now + SPENT_FRESH_S, spent)
    return spent


def item_ended(ctx: WorkerContext, job: JobRequest) -> None:
    """Tell the batch one of its items ended (never raises)."""
    if job.batch_id is not None:
        progress.item_ended(ctx.store, ctx.redis, ctx.bus, ctx.sender, job.batch_id)
