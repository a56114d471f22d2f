"""Callbacks as durable deliveries: the terminal event of a job with a callback_url is POSTed by its own
Celery task, `qvq.callback` on queue `qvq-callbacks` (worker/tasks.py), tried again with exponential
backoff (contracts/retry.CALLBACK_DELIVERY) for up to QVQ_CALLBACK_MAX_AGE_S (24 h), every try recorded
in `qvq_callbacks` (GET /v1/tasks/{id} shows it).

Why not `self.retry(countdown=...)`: on a Redis broker a countdown is an ETA message that the worker
holds in memory, unacknowledged, until it is due; kombu redelivers it after the visibility timeout (2 h
here) wherever it is, and a worker restart loses the timing of every held one. Here the database row is
the truth (status, next_attempt_at), and a due time is only a wake-up:

- a try that must be repeated sets the row's next_attempt_at and ZADDs the event id to the Redis sorted
  set `qvq:callbacks:due` (score: the unix time it is due);
- a small thread in every worker process polls the set (scheduler.py); whoever ZREMs a due id sends
  `qvq.callback` (one winner per due item);
- a try starts by claiming the row (an UPDATE that only succeeds while it is pending, due and not
  claimed: `claimed_until` a lease ahead, QVQ_CALLBACK_TIMEOUT_S + CLAIM_MARGIN_S): two messages for one
  delivery, or a redelivery asked while a try is in flight, never make two POSTs at once, and a worker
  killed mid-try leaves the row due again when the claim ends;
- the Celery task only claims: the POST runs on the worker's event loop (worker/loop.py), at most
  CALLBACK_SLOTS at once per process, each within its total deadline, so a slow receiver never holds a
  worker thread and receivers can never take a stream's place; a try that waited for a slot so long that
  it could outlive its claim is not made (the row comes due again);
- every SWEEP_S the scheduler re-adds pending rows overdue by SWEEP_GRACE_S to the set, so deliveries
  survive a Redis restart, a lost message or a killed worker.

Outcomes: 2xx delivered; 410 gone (the receiver asked us to stop); a URL the SSRF guard refuses: failed
at once; anything else: tried again until QVQ_CALLBACK_MAX_AGE_S has passed, then failed.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import weakref
from typing import Any

import httpx
import structlog

from contracts import callbacks as cb
from contracts import keys, retry
from contracts import metrics as m
from contracts.logging import get_logger
from contracts.settings import Settings
from contracts.ssrf import UrlGuard
from contracts.store import (
    CALLBACK_DELIVERED,
    CALLBACK_FAILED,
    CALLBACK_GONE,
    CALLBACK_PENDING,
    CallbackRecord,
    iso,
)
from worker.callbacks import post
from worker.context import WorkerContext

log = get_logger(__name__)
CLAIM_MARGIN_S = 30.0  # a claim outlives the longest try (QVQ_CALLBACK_TIMEOUT_S) by this much
CALLBACK_SLOTS = 256  # tries in flight at once per worker process (each a coroutine and a socket)
_FINAL = {post.Outcome.DELIVERED: CALLBACK_DELIVERED, post.Outcome.GONE: CALLBACK_GONE,
          post.Outcome.REFUSED: CALLBACK_FAILED}


# -- scheduling ----------------------------------------------------------------------------------
def schedule(ctx: WorkerContext, url: str, event: dict[str, Any]) -> None:
    """Record the terminal event's delivery and hand it to a callbacks worker; never raises (the task's
    result is persisted already; a delivery not recorded here is logged)."""
    task_id = str(event["task_id"])
    try:
        record = ctx.store.get(task_id)
        run = record.run if record else 0
        event_id = cb.event_id(task_id, run, event.get("seq"))
        body = {**event, "event_id": event_id, "run": run}
        if ctx.store.add_callback(event_id=event_id, task_id=task_id, run=run, url=url, event=body,
                                  tenant=record.tenant if record else None):
            enqueue(ctx, event_id)
    except Exception as exc:
        log.error("callback.schedule_failed", task_id=task_id, error=f"{type(exc).__name__}: {exc}")


def enqueue(ctx: WorkerContext, event_id: str) -> None:
    """Send the delivery's task; when the broker is down the row stays due and a sweep sends it."""
    try:
        ctx.sender.send_callback(event_id)
    except Exception as exc:
        log.warning("callback.enqueue_failed", event_id=event_id, error=type(exc).__name__)


# -- one try -------------------------------------------------------------------------------------
def claim_lease_s(settings: Settings) -> float:
    return settings.callback_timeout_s + CLAIM_MARGIN_S


def send(ctx: WorkerContext, event_id: str) -> str | None:
    """Claim a due delivery and start its try on the loop; "sending", or None when it was not due (or
    another sender won, or a try is in flight)."""
    record = ctx.store.claim_callback(event_id, claim_lease_s(ctx.settings))
    if record is None:
        return None
    ctx.loop.spawn(try_delivery(ctx, record, claimed_at=time.monotonic()))
    return "sending"


async def try_delivery(ctx: WorkerContext, record: CallbackRecord, *, claimed_at: float) -> str | None:
    """Make one try of a claimed delivery and record it; its status, or None when the try was not made."""
    with structlog.contextvars.bound_contextvars(task_id=record.task_id, event_id=record.event_id):
        return await _try_delivery(ctx, record, claimed_at)


async def _try_delivery(ctx: WorkerContext, record: CallbackRecord, claimed_at: float) -> str | None:
    settings = ctx.settings
    async with _slots():
        if time.monotonic() - claimed_at > CLAIM_MARGIN_S:  # the try could outlive the claim: not now
            log.warning("callback.try_skipped", reason="waited too long for a slot")
            return None
        secret = settings.tenant_webhook_secrets.get(record.tenant or "", settings.webhook_secret)
        tried = await post.attempt(record.url, record.event, secret=secret, guard=_guard(settings),
                                   client=_client(), timeout_s=settings.callback_timeout_s)
    status, next_at = next_state(settings, record, tried.outcome)
    await asyncio.to_thread(_record, ctx, record, tried, status, next_at)
    return status


def _record(ctx: WorkerContext, record: CallbackRecord, tried: post.Attempt, status: str,
            next_at: dt.datetime | None) -> None:
    event_id = record.event_id
    ctx.store.record_callback_attempt(event_id, status=status, next_attempt_at=next_at, attempt={
        "at": iso(dt.datetime.now(dt.UTC)), "outcome": str(tried.outcome),
        "status_code": tried.status_code, "error": tried.error})
    if next_at is not None:
        ctx.redis.zadd(keys.CALLBACKS_DUE, {event_id: next_at.timestamp()})
    m.CALLBACK_TRIES.labels(str(tried.outcome)).inc()
    log.info("callback.attempt", attempt=record.attempts + 1, outcome=str(tried.outcome),
             status_code=tried.status_code, delivery=status)


def next_state(settings: Settings, record: CallbackRecord, outcome: post.Outcome) -> tuple[str, dt.datetime | None]:
    """The delivery's status after a try, and when it is due again (None: final)."""
    if outcome in _FINAL:
        return _FINAL[outcome], None
    backoff = retry.CALLBACK_DELIVERY.with_limits(settings.callback_backoff_s, settings.callback_backoff_max_s)
    due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=backoff.delay(record.attempts + 1))
    if (due - record.created_at).total_seconds() > settings.callback_max_age_s:
        return CALLBACK_FAILED, None
    return CALLBACK_PENDING, due


# One client and one semaphore per event loop (both belong to the loop that made them).
_per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, tuple[httpx.AsyncClient, asyncio.Semaphore]] = (
    weakref.WeakKeyDictionary())
_guards: dict[bool, UrlGuard] = {}


def _loop_parts() -> tuple[httpx.AsyncClient, asyncio.Semaphore]:
    loop = asyncio.get_running_loop()
    if loop not in _per_loop:
        _per_loop[loop] = (post.make_client(), asyncio.Semaphore(CALLBACK_SLOTS))
    return _per_loop[loop]


def _client() -> httpx.AsyncClient:
    return _loop_parts()[0]


def _slots() -> asyncio.Semaphore:
    return _loop_parts()[1]


def _guard(settings: Settings) -> UrlGuard:
    if settings.allow_private_urls not in _guards:
        _guards[settings.allow_private_urls] = post.make_guard(settings.allow_private_urls)
    return _guards[settings.allow_private_urls]
