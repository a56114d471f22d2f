"""A worker process's life, in one place: every Celery signal the worker handles, the context built once,
and every background loop started and stopped.

    celeryd_init          logging configured before Celery's first line (its notices as JSON lines)
    setup_logging         Celery does not take the root logger over
    celeryd_after_setup   the banner becomes a log line (LOG_FORMAT=json); qvq-callbacks is consumed too
    worker_init           the delivery settings are checked: the worker refuses to start when they break
                          the guarantees, or when DashScope is named without a key; tracing set up
    worker_ready          the context is built and its loops started (the event loop, leases, cancel
                          watcher, flow mover), the model endpoint probed on the loop (not waited for),
                          then the health endpoints, the recovery sweep and the callback scheduler start
    worker_shutting_down  the heartbeat stops (not ready), the sweep stops; on a warm shutdown the running
                          streams are handed back after QVQ_SHUTDOWN_GRACE_S
    worker_shutdown       every loop stops, the context closes
    task_received         the consumer took a message: the liveness probe's sign of life
    task_revoked          a revoked task is cancelled (contracts/cancel.py)
    task_failure          logged

Celery loads this module by name (worker/celery.py's `include=`); nothing imports it but the tasks,
which take the context from `get_context()`.
"""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import celery.apps.worker
from celery import signals
from celery.worker import state as worker_state
from PIL import Image

from contracts import broker, tracing
from contracts import callbacks as cb
from contracts.cancel import cancel_task
from contracts.logging import configure, get_logger
from contracts.sender import TaskSender
from contracts.settings import get_settings
from worker.callbacks.scheduler import DueScheduler
from worker.celery import app, delivery_problems
from worker.context import WorkerContext
from worker.ops.health import ConsumerWatch, Heartbeat, serve_metrics
from worker.ops.probe import missing_key
from worker.ops.probe import report as report_probe
from worker.recovery.sweep import Sweep

log = get_logger(__name__)


@dataclass
class _Process:
    """What this worker process runs besides its tasks."""

    context: WorkerContext
    pid: int
    sweep: Sweep | None = None
    scheduler: DueScheduler | None = None
    heartbeat: Heartbeat | None = None
    metrics: Any = None
    consumer: ConsumerWatch | None = None


_process: _Process | None = None
_lock = threading.Lock()
_pool_size: int | None = None  # the pool's real size (-c on the command line wins over QVQ_WORKER_CONCURRENCY)
Handler = TypeVar("Handler", bound=Callable[..., None])


def on(signal: Any) -> Callable[[Handler], Handler]:
    """`signal.connect`, typed (Celery ships no type hints)."""
    def connect(handler: Handler) -> Handler:
        signal.connect(handler)
        return handler

    return connect


def get_context() -> WorkerContext:
    """The process's context, built and started on first use (after any fork)."""
    global _process
    with _lock:
        if _process is None or _process.pid != os.getpid():
            settings = get_settings()
            if _pool_size and _pool_size != settings.worker_concurrency:
                settings = settings.with_overrides(worker_concurrency=_pool_size)
            context = WorkerContext.build(settings, TaskSender(app, settings.queue)).start()
            _process = _Process(context, os.getpid())
        return _process.context


# -- starting ------------------------------------------------------------------------------------
@on(signals.celeryd_init)
def _log_early(**_: Any) -> None:
    """Configure logging before Celery writes its first line (the privileges warning, the banner)."""
    settings = get_settings()
    configure(settings.log_format, settings.log_level)
    if settings.log_format == "json":
        celery.apps.worker.safe_say = _say_json


@on(signals.setup_logging)
def _setup_logging(**_: Any) -> None:
    settings = get_settings()
    configure(settings.log_format, settings.log_level)


def _say_json(msg: str, f: Any = sys.__stderr__) -> None:
    """Celery's shutdown notices ("worker: Warm shutdown") as JSON lines; written directly, as Celery
    does, because they are said from a signal handler."""
    line = {"event": "worker.notice", "message": str(msg), "level": "info", "logger": "celery.apps.worker",
            "timestamp": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")}
    print(json.dumps(line), file=f or sys.__stderr__, flush=True)


@on(signals.celeryd_after_setup)
def _after_setup(instance: Any = None, **_: Any) -> None:
    """Every worker also consumes qvq-callbacks, whatever -Q it was started with; with LOG_FORMAT=json,
    Celery's banner (plain text on stdout) becomes a log line."""
    global _pool_size
    if instance is None:
        return
    _pool_size = getattr(instance, "concurrency", None) or None
    instance.app.amqp.queues.select_add(cb.QUEUE)
    if get_settings().log_format != "json":
        return
    instance.quiet = True
    log.info("worker.starting", hostname=getattr(instance, "hostname", None),
             concurrency=getattr(instance, "concurrency", None), pool="threads",
             queues=sorted(instance.app.amqp.queues.keys()))


@on(signals.worker_init)
def _check_delivery(sender: Any = None, **_: Any) -> None:
    """Log the delivery settings, and refuse to start when they break the guarantees."""
    settings = get_settings()
    conf = sender.app.conf if sender is not None else app.conf
    options = conf.get("broker_transport_options") or {}
    log.info("worker.delivery", acks_late=conf.get("task_acks_late"),
             reject_on_worker_lost=conf.get("task_reject_on_worker_lost"),
             prefetch_multiplier=conf.get("worker_prefetch_multiplier"),
             visibility_timeout_s=options.get("visibility_timeout"), task_timeout_s=settings.task_timeout_s,
             lease_ttl_s=settings.lease_ttl_s, max_attempts=settings.max_attempts,
             stall_timeout_s=settings.stall_timeout_s, restore_interval_s=options.get("unacked_restore_interval"))
    problems = delivery_problems(conf, settings) + [problem for problem in [missing_key(settings)] if problem]
    if problems:
        log.error("worker.refused", problems=problems)
        print("qvq worker refused to start: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(2)  # bad settings, as the qvq command's exit codes say
    tracing.setup(settings, "qvq-worker")  # before the first task: Celery's, httpx's, redis' and SQL spans


@on(signals.worker_ready)
def _start(**_: Any) -> None:
    """Connect to Redis, the store and the model endpoint now (not on the first task), then start the
    process-wide loops."""
    context = get_context()
    settings = context.settings
    log.info("worker.ready", visibility_timeout_s=settings.visibility_timeout_s, task_timeout_s=settings.task_timeout_s,
             model_endpoint=settings.base_url, real_service=settings.uses_real_service, queue=settings.queue)
    context.loop.spawn(report_probe(settings))  # not waited for: consuming does not depend on it
    assert _process is not None
    if settings.heartbeat_file and _process.heartbeat is None:
        _process.heartbeat = Heartbeat(settings.heartbeat_file).start()
    if _process.metrics is None:
        _process.consumer = _consumer_watch(context)
        _process.metrics = serve_metrics(settings.metrics_port, consumer=_process.consumer)
    if _process.sweep is None:
        _process.sweep = Sweep(context.redis, context.store, context.bus, context.sender.send_run,
                               interval_s=settings.sweep_interval_s, lease_ttl_s=settings.lease_ttl_s,
                               requeue_grace_s=settings.requeue_grace_s, event_ttl_s=settings.event_ttl_s,
                               queue=settings.queue, broker_client=context.broker).start()
    if _process.scheduler is None:
        _process.scheduler = DueScheduler(context).start()
    _settle_heap(context)


def _settle_heap(context: WorkerContext) -> None:
    """Before the first task: load what the first runs would load lazily (every image decoder, the
    model client's resources), then freeze what the process built to start. An import holds the GIL for
    tens of ms, and a full collection scanned those ~200,000 objects again each time: 60-100 ms pauses in
    the middle of 200 streams, 17-30 ms once frozen (bench/RESULTS.md)."""
    try:
        Image.init()
        context.loop.run(context.model.warm())
    except Exception as exc:  # only a head start: the first run loads it otherwise
        log.warning("worker.warm_up_failed", error=f"{type(exc).__name__}: {exc}")
    gc.collect()
    gc.freeze()


# -- stopping ------------------------------------------------------------------------------------
@on(signals.worker_shutting_down)
def _shutting_down(sig: str = "", how: str = "", **_: Any) -> None:
    """Not ready any more; a warm shutdown (SIGTERM) lets running streams go on for QVQ_SHUTDOWN_GRACE_S,
    then stops them (nothing written) and frees their leases: each task's message goes back to the
    queue, so another worker resumes it at once instead of after the lease TTL or the visibility timeout."""
    if _process is None:
        return
    if _process.heartbeat is not None:
        _process.heartbeat.stop()
        _process.heartbeat = None
    if _process.sweep is not None:
        _process.sweep.stop()
        _process.sweep = None
    if how.lower() != "warm":
        return
    grace = _process.context.settings.shutdown_grace_s
    leases = _process.context.leases
    log.info("worker.shutting_down", signal=sig, grace_s=grace, running=leases.held())
    timer = threading.Timer(max(0.0, grace), leases.hand_back_all)
    timer.daemon = True
    timer.start()


@on(signals.worker_shutdown)
def _stop(**_: Any) -> None:
    global _process
    with _lock:
        process, _process = _process, None
    if process is None or process.pid != os.getpid():
        return
    for loop in (process.sweep, process.scheduler, process.heartbeat):
        if loop is not None:
            loop.stop()
    process.context.close()
    tracing.shutdown()  # the spans still buffered are exported


def _consumer_watch(context: WorkerContext) -> ConsumerWatch:
    """The worker's liveness: it takes messages while some wait in its queues (worker/ops/health.py)."""
    settings = context.settings

    def waiting() -> int:
        return sum(broker.depth(context.broker, queue) for queue in (settings.queue, cb.QUEUE))

    return ConsumerWatch(waiting, busy=lambda: len(worker_state.reserved_requests) >= settings.worker_concurrency)


# -- tasks ---------------------------------------------------------------------------------------
@on(signals.task_received)
def _on_received(**_: Any) -> None:
    """The consumer took a message (the liveness probe's sign of life)."""
    if _process is not None and _process.consumer is not None:
        _process.consumer.received()


@on(signals.task_revoked)
def _on_revoked(request: Any = None, expired: bool = False, **_: Any) -> None:
    """`celery control revoke TASK_ID`: the task is cancelled, like `qvq cancel`."""
    task_id = getattr(request, "id", None)
    if not task_id:
        return
    context = get_context()
    record = context.store.get(task_id)
    if record is not None and cancel_task(record, store=context.store, client=context.redis, bus=context.bus):
        log.warning("task.revoked", task_id=task_id, expired=expired)


@on(signals.task_failure)
def _on_failure(task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
    log.info("celery.task_failure", task_id=task_id, error=str(exception), kind=type(exception).__name__)
