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
- a try starts by claiming the row (an UPDATE that only succeeds while it is pending and due, moving
  next_attempt_at a lease ahead): two messages for one delivery never make two POSTs at once, and a
  worker killed mid-try leaves the row due again when the lease ends;
- every SWEEP_S the scheduler re-adds pending rows overdue by SWEEP_GRACE_S to the set, so deliveries
  survive a Redis restart, a lost message or a killed worker.

Outcomes: 2xx delivered; 410 gone (the receiver asked us to stop); a URL the SSRF guard refuses: failed
at once; anything else: tried again until QVQ_CALLBACK_MAX_AGE_S has passed, then failed.
"""

from __future__ import annotations

import datetime as dt
import threading
from typing import Any

import httpx

from contracts import callbacks as cb
from contracts import keys, retry
from contracts.logging import get_logger
from contracts.settings import Settings
from contracts.ssrf import UrlGuard
from contracts.store import (
    CALLBACK_DELIVERED,
    CALLBACK_FAILED,
    CALLBACK_GONE,
    CALLBACK_PENDING,
    CallbackRecord,
)
from worker.callbacks import post
from worker.context import WorkerContext

log = get_logger(__name__)
CLAIM_LEASE_S = 60.0  # longer than one try can take (post.TIMEOUT), so a live try is never doubled
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
def send(ctx: WorkerContext, event_id: str) -> str | None:
    """Make one try of a due delivery and record it; None when it was not due (or another sender won)."""
    record = ctx.store.claim_callback(event_id, CLAIM_LEASE_S)
    if record is None:
        return None
    settings = ctx.settings
    secret = settings.tenant_webhook_secrets.get(record.tenant or "", settings.webhook_secret)
    tried = post.attempt(record.url, record.event, secret=secret, guard=_guard(settings), client=_client())
    status, next_at = next_state(settings, record, tried.outcome)
    ctx.store.record_callback_attempt(event_id, status=status, next_attempt_at=next_at, attempt={
        "at": dt.datetime.now(dt.UTC).isoformat(), "outcome": str(tried.outcome),
        "status_code": tried.status_code, "error": tried.error})
    if next_at is not None:
        ctx.redis.zadd(keys.CALLBACKS_DUE, {event_id: next_at.timestamp()})
    log.info("callback.attempt", event_id=event_id, attempt=record.attempts + 1, outcome=str(tried.outcome),
             status_code=tried.status_code, delivery=status)
    return status


def next_state(settings: Settings, record: CallbackRecord, outcome: post.Outcome) -> tuple[str, dt.datetime | None]:
    """The delivery's status after a try, and when it is due again (None: final)."""
    if outcome in _FINAL:
        return _FINAL[outcome], None
    backoff = retry.CALLBACK_DELIVERY.with_limits(settings.callback_backoff_s, settings.callback_backoff_max_s)
    due = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=backoff.delay(record.attempts + 1))
    if (due - record.created_at).total_seconds() > settings.callback_max_age_s:
        return CALLBACK_FAILED, None
    return CALLBACK_PENDING, due


_http: httpx.Client | None = None
_guards: dict[bool, UrlGuard] = {}
_lock = threading.Lock()


def _client() -> httpx.Client:
    global _http
    with _lock:
        if _http is None:
            _http = post.make_client()
        return _http


def _guard(settings: Settings) -> UrlGuard:
    with _lock:
        if settings.allow_private_urls not in _guards:
            _guards[settings.allow_private_urls] = post.make_guard(settings.allow_private_urls)
        return _guards[settings.allow_private_urls]
