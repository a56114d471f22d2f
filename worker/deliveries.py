"""Callbacks as durable deliveries: the terminal event of a job with a callback_url is POSTed by its own
Celery task, `qvq.callback` on queue `qvq-callbacks`, tried again with exponential backoff for up to
QVQ_CALLBACK_MAX_AGE_S (24 h), every try recorded in `qvq_callbacks` (GET /v1/tasks/{id} shows it).

Why not `self.retry(countdown=...)`: on a Redis broker a countdown is an ETA message that the worker
holds in memory, unacknowledged, until it is due; kombu redelivers it after the visibility timeout (2 h
here) wherever it is, and a worker restart loses the timing of every held one. Here the database row is
the truth (status, next_attempt_at), and a due time is only a wake-up:

- a try that must be repeated sets the row's next_attempt_at and ZADDs the event id to the Redis sorted
  set `qvq:callbacks:due` (score: the unix time it is due);
- a small thread in every worker process polls the set; whoever ZREMs a due id sends `qvq.callback`
  (one winner per due item);
- a try starts by claiming the row (an UPDATE that only succeeds while it is pending and due, moving
  next_attempt_at a lease ahead): two messages for one delivery never make two POSTs at once, and a
  worker killed mid-try leaves the row due again when the lease ends;
- every SWEEP_S the thread re-adds pending rows overdue by SWEEP_GRACE_S to the set, so deliveries
  survive a Redis restart, a lost message or a killed worker.

Outcomes: 2xx delivered; 410 gone (the receiver asked us to stop); a URL the SSRF guard refuses: failed
at once; anything else: tried again until QVQ_CALLBACK_MAX_AGE_S has passed, then failed.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from typing import Any

import httpx
from celery import signals

from contracts import callbacks as cb
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
from worker import callback
from worker.app import app
from worker.context import WorkerContext, get_context

log = get_logger(__name__)
CLAIM_LEASE_S = 60.0  # longer than one try can take (callback.TIMEOUT), so a live try is never doubled
SWEEP_S = 15.0
SWEEP_GRACE_S = 30.0  # a row overdue by this much lost its wake-up (Redis restarted, a message was lost)
_FINAL = {callback.Outcome.DELIVERED: CALLBACK_DELIVERED, callback.Outcome.GONE: CALLBACK_GONE,
          callback.Outcome.REFUSED: CALLBACK_FAILED}


@app.task(name=cb.TASK_NAME, acks_late=True, ignore_result=True)
def deliver_callback(event_id: str) -> str | None:
    return send(get_context(), event_id)


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
            enqueue(event_id)
    except Exception as exc:
        log.error("callback.schedule_failed", task_id=task_id, error=f"{type(exc).__name__}: {exc}")


def enqueue(event_id: str) -> None:
    """Send the delivery's task; when the broker is down the row stays due and a sweep sends it."""
    try:
        app.send_task(cb.TASK_NAME, args=[event_id], queue=cb.QUEUE, serializer="json")
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
    tried = callback.attempt(record.url, record.event, secret=secret, guard=_guard(settings), client=_client())
    status, next_at = next_state(settings, record, tried.outcome)
    ctx.store.record_callback_attempt(event_id, status=status, next_attempt_at=next_at, attempt={
        "at": dt.datetime.now(dt.UTC).isoformat(), "outcome": str(tried.outcome),
        "status_code": tried.status_code, "error": tried.error})
    if next_at is not None:
        ctx.redis.zadd(cb.DUE_KEY, {event_id: next_at.timestamp()})
    log.info("callback.attempt", event_id=event_id, attempt=record.attempts + 1, outcome=str(tried.outcome),
             status_code=tried.status_code, delivery=status)
    return status


def next_state(settings: Settings, record: CallbackRecord, outcome: callback.Outcome) -> tuple[str, dt.datetime | None]:
    """The delivery's status after a try, and when it is due again (None: final)."""
    if outcome in _FINAL:
        return _FINAL[outcome], None
    now = dt.datetime.now(dt.UTC)
    due = now + dt.timedelta(seconds=cb.backoff_s(record.attempts + 1, settings.callback_backoff_s,
                                                  settings.callback_backoff_max_s))
    created = record.created_at if record.created_at.tzinfo else record.created_at.replace(tzinfo=dt.UTC)
    if (due - created).total_seconds() > settings.callback_max_age_s:
        return CALLBACK_FAILED, None
    return CALLBACK_PENDING, due


_http: httpx.Client | None = None
_guards: dict[bool, UrlGuard] = {}
_lock = threading.Lock()


def _client() -> httpx.Client:
    global _http
    with _lock:
        if _http is None:
            _http = callback.make_client()
        return _http


def _guard(settings: Settings) -> UrlGuard:
    with _lock:
        if settings.allow_private_urls not in _guards:
            _guards[settings.allow_private_urls] = callback.make_guard(settings.allow_private_urls)
        return _guards[settings.allow_private_urls]


# -- the due-time scheduler ----------------------------------------------------------------------
class DueScheduler:
    """Sends the deliveries whose time has come: one thread per worker process."""

    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.poll_s = max(0.05, min(1.0, ctx.settings.callback_backoff_s / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qvq-callbacks-due", daemon=True)
        self._next_sweep = 0.0

    def start(self) -> DueScheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception as exc:  # Redis or the database away: the next tick tries again
                log.warning("callback.scheduler_failed", error=f"{type(exc).__name__}: {exc}")

    def tick(self) -> int:
        """Send what is due now; every SWEEP_S also re-add due rows from the database. Returns the count sent."""
        now = time.time()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
            overdue = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=SWEEP_GRACE_S)
            for event_id, at in self.ctx.store.due_callbacks(at=overdue):
                moment = at if at.tzinfo else at.replace(tzinfo=dt.UTC)
                self.ctx.redis.zadd(cb.DUE_KEY, {event_id: moment.timestamp()}, nx=True)
        sent = 0
        members: list[bytes] = self.ctx.redis.zrangebyscore(  # type: ignore[assignment]
            cb.DUE_KEY, "-inf", now, start=0, num=200)
        for member in members:
            if self.ctx.redis.zrem(cb.DUE_KEY, member):  # the one process that removed it sends it
                enqueue(member.decode())
                sent += 1
        return sent


_scheduler: DueScheduler | None = None


@signals.celeryd_after_setup.connect
def _consume_callbacks(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Every worker also consumes qvq-callbacks, whatever -Q it was started with."""
    if instance is not None:
        instance.app.amqp.queues.select_add(cb.QUEUE)


@signals.worker_ready.connect
def _start_scheduler(**_: Any) -> None:
    global _scheduler
    if _scheduler is None:
        _scheduler = DueScheduler(get_context()).start()


@signals.worker_shutdown.connect
def _stop_scheduler(**_: Any) -> None:
    global _scheduler
    if _scheduler is not None:
        _scheduler.stop()
        _scheduler = None
