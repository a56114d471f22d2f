"""An item of a batch, as the worker sees it: before it runs, its batch may stop it (cancelled: the item is
cancelled; `max_cost_cny` spent: the item fails with budget.exceeded, nothing called); after it ends, the
batch's progress and completion (contracts/batches/progress.py)."""

from __future__ import annotations

from decimal import Decimal

from contracts.batches import progress
from contracts.catalog import money_text
from contracts.errors import BudgetError, StreamStopped
from contracts.job import JobRequest
from worker.context import WorkerContext
from worker.persist import store_call
from worker.recovery.cancel import RunWatch


def admit_item(ctx: WorkerContext, job: JobRequest, watch: RunWatch) -> None:
    """Whether the item may run now: StreamStopped (cancelled) when its batch was cancelled, BudgetError
    when the batch's `max_cost_cny` is spent. Items already calling the model finish: the cap can be
    passed by what is in flight at the moment it is reached, never by an item started after."""
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
    spent = store_call(ctx.store.batch_spent, job.batch_id)
    if spent >= Decimal(cap):
        raise BudgetError(f"batch {job.batch_id} has spent {money_text(spent)} CNY of its max_cost_cny "
                          f"{money_text(cap)}; this item was not run")


def item_ended(ctx: WorkerContext, job: JobRequest) -> None:
    """Tell the batch one of its items ended (never raises)."""
    if job.batch_id is not None:
        progress.item_ended(ctx.store, ctx.redis, ctx.bus, ctx.sender, job.batch_id)
