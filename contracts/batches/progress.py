"""A batch's progress and its end: after an item ends (the worker's terminal write, a cancel, the API's
listing finishing), `item_ended` publishes batch.progress at most every PROGRESS_EVERY_S per batch (a
Redis SET NX with that expiry decides who publishes), and claims the batch's completion when no item is
queued or running: one caller per round wins the claim, publishes batch.completed and records the
batch callback (a delivery like a task's: contracts/store/callbacks.py, posted by a callbacks worker).

Never raises: an item's own result is already persisted; a lost progress event is only a missed tick
(GET /v1/batches/{id} is always exact), and a lost completion is claimed again by the next item or call.
"""

from __future__ import annotations

import time
from typing import Any

import redis

from contracts import callbacks as cb
from contracts import events as ev
from contracts import keys
from contracts.bus import EventBus
from contracts.catalog import money_text
from contracts.logging import get_logger
from contracts.sender import TaskSender
from contracts.store import BatchRecord, BatchTally, Store

log = get_logger(__name__)
PROGRESS_EVERY_S = 0.25  # at most four batch.progress a second, per batch
#: A batch's statuses (status_of); ENDED: every item of the batch ended.
LISTING, RUNNING, CANCELLING, COMPLETED, CANCELLED = "listing", "running", "cancelling", "completed", "cancelled"
BATCH_STATUSES = (LISTING, RUNNING, CANCELLING, COMPLETED, CANCELLED)
ENDED = (COMPLETED, CANCELLED)


def tally_fields(record: BatchRecord, tally: BatchTally, *, at: float | None = None) -> dict[str, Any]:
    """The tally as events and GET /v1/batches/{id} show it: counts, done, tokens, cost, rate, ETA."""
    elapsed = max(1e-3, (at or time.time()) - record.created_at.timestamp())
    rate = tally.done / elapsed
    remaining = tally.open
    return {"items": tally.total, "counts": tally.counts, "done": tally.done, "tokens": tally.tokens,
            "cost": money_text(tally.cost), "rate": round(rate, 3),
            "eta_s": 0.0 if remaining == 0 else (round(remaining / rate, 1) if rate > 0 else None),
            "round": record.round, "listed": record.listed}


def status_of(record: BatchRecord) -> str:
    """listing (items are being added), running, cancelling (items still stopping), completed or cancelled."""
    if record.completed_at is not None:
        return CANCELLED if record.cancelled_at is not None else COMPLETED
    if record.cancelled_at is not None:
        return CANCELLING
    return RUNNING if record.listed else LISTING


def item_ended(store: Store, client: redis.Redis, bus: EventBus, sender: TaskSender, batch_id: str, *,
               force: bool = False) -> None:
    """An item of the batch ended (or the listing did): progress, maybe, and the completion, once."""
    try:
        claimed = store.claim_completion(batch_id)
        if not (claimed or force or client.set(keys.batch_tick_key(batch_id), 1, nx=True,
                                                px=int(PROGRESS_EVERY_S * 1000))):
            return
        record = store.get_batch(batch_id)
        if record is None:
            return
        fields = tally_fields(record, store.tally(batch_id))
        bus.publish_batch(batch_id, ev.BATCH_PROGRESS, **fields)
        if claimed:
            _completed(store, bus, sender, record, fields)
    except Exception as exc:  # the item's result is persisted; the next end (or GET) tells the rest
        log.warning("batch.progress_failed", batch_id=batch_id, error=f"{type(exc).__name__}: {exc}")


def _completed(store: Store, bus: EventBus, sender: TaskSender, record: BatchRecord, fields: dict[str, Any]) -> None:
    status = status_of(record)
    seq = bus.publish_batch(record.id, ev.BATCH_COMPLETED, final=True, status=status, **fields)
    log.info("batch.completed", batch_id=record.id, status=status, items=fields["items"], cost=fields["cost"])
    url = record.request.get("callback_url")
    if not url:
        return
    owner = f"batch:{record.id}"
    event_id = cb.event_id(owner, record.round, seq)
    event = {"seq": seq, "batch_id": record.id, "type": ev.BATCH_COMPLETED, "ts": time.time(), "status": status,
             "event_id": event_id, "run": record.round, **fields}
    if store.add_callback(event_id=event_id, task_id=owner, run=record.round, tenant=record.tenant, url=url,
                          event=event):
        try:
            sender.send_callback(event_id)
        except Exception as exc:  # the row stays due: the callbacks sweep sends it
            log.warning("callback.enqueue_failed", event_id=event_id, error=type(exc).__name__)
