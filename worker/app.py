"""The Celery app: Redis broker, JSON only, and the delivery settings a minutes-long stream needs.

- acks_late + reject_on_worker_lost: a task whose worker dies is delivered again, not lost.
- prefetch multiplier 1: a worker reserves no more tasks than it has threads to run them.
- visibility timeout longer than the longest allowed task (checked when settings are read, and
  again against the broker's transport options when the worker starts: it refuses to start if they
  disagree), so a running stream is not handed to a second worker while the first is still on it;
  should it happen anyway, the task lease (worker/lease.py) keeps the second delivery from running.
- kombu's Redis transport brings back the messages of a dead worker only when a consumer sweeps the
  unacked set after the visibility timeout; the sweep period is set from the visibility timeout so a
  short one (tests, chaos drills) is honoured within seconds, not kombu's default ~100 s.
- the broker connection is retried forever (a worker outlives a Redis restart).
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import threading
from collections.abc import Mapping
from typing import Any

from celery import Celery, signals

from contracts.job import TASK_NAME
from contracts.logging import configure, get_logger
from contracts.settings import Settings, get_settings

log = get_logger(__name__)


def restore_interval_s(visibility_timeout_s: int) -> int:
    """How often a worker sweeps for messages whose worker died (1..10 s, a quarter of the timeout)."""
    return max(1, min(10, visibility_timeout_s // 4))


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.celery_broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,  # forever (0 would mean: never retry)
        "broker_pool_limit": settings.worker_concurrency + 10,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "unacked_restore_interval": restore_interval_s(settings.visibility_timeout_s),
            "unacked_restore_throttle": 1,
            # a worker killed while holding the sweep's mutex must not block sweeps for kombu's 300 s
            "unacked_mutex_expire": max(5, min(300, settings.visibility_timeout_s // 2)),
            "max_connections": settings.worker_concurrency + 20,
            "socket_keepalive": True,
            "socket_connect_timeout": 5,
            "health_check_interval": 25,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,  # a task that ended failed (FAILURE) is still acknowledged
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}, "qvq.callback": {"queue": "qvq-callbacks"}},
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": True,  # Flower and `celery events` see every task and its true state
        "task_send_sent_event": True,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
    }


def guard_kombu_closed_transport() -> None:
    """Keep a broker connection loss recoverable (kombu 5.7 / Celery 5.7, Redis transport).

    On a connection loss Celery's consumer calls `connection.collect()`, which detaches the transport
    (`transport.client = None`), then `connection.close()`: the Redis channel's close then tries to
    restore its unacked messages through that detached transport and raises AttributeError
    ('NoneType' object has no attribute 'hostname'; the same path as celery/kombu#582 and #970), which
    Celery treats as unrecoverable: the worker shuts down on a Redis restart instead of reconnecting.
    Raising a connection error there instead lets the close ignore it and the consumer reconnect; the
    messages it could not restore come back through the visibility-timeout sweep.
    """
    from kombu.transport import redis as kombu_redis

    original = kombu_redis.Channel._connparams
    if getattr(original, "_qvq_guarded", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise kombu_redis.redis.exceptions.ConnectionError("the broker connection was closed")
        return original(self, asynchronous)

    _connparams._qvq_guarded = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    guard_kombu_closed_transport()
    app = Celery("qvq", include=["worker.tasks", "worker.deliveries"])
    app.conf.update(celery_config(settings))
    return app


app = create_app()


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = get_settings()
    configure(settings.log_format, settings.log_level)


def delivery_problems(conf: Mapping[str, Any], settings: Settings) -> list[str]:
    """What in the Celery configuration breaks the delivery guarantees (README, Guarantees)."""
    problems = []
    if not conf.get("task_acks_late"):
        problems.append("task_acks_late must be on (a killed worker would lose its tasks)")
    if not conf.get("task_reject_on_worker_lost"):
        problems.append("task_reject_on_worker_lost must be on")
    if conf.get("worker_prefetch_multiplier") != 1:
        problems.append(f"worker_prefetch_multiplier is {conf.get('worker_prefetch_multiplier')!r}, must be 1 "
                        "(tasks would wait behind a long stream)")
    visibility = (conf.get("broker_transport_options") or {}).get("visibility_timeout")
    if visibility is None:
        problems.append("the broker transport options set no visibility_timeout (kombu's default is 1 h)")
    elif visibility != settings.visibility_timeout_s:
        problems.append(f"the broker's visibility_timeout ({visibility}) differs from QVQ_VISIBILITY_TIMEOUT_S "
                        f"({settings.visibility_timeout_s})")
    if visibility is not None and visibility <= settings.task_timeout_s:
        problems.append(f"the broker's visibility_timeout ({visibility}) must exceed QVQ_TASK_TIMEOUT_S "
                        f"({settings.task_timeout_s:g}), or a running task is delivered a second time")
    return problems


@signals.worker_init.connect
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
    from worker.endpoint import missing_key

    problems = delivery_problems(conf, settings) + [problem for problem in [missing_key(settings)] if problem]
    if problems:
        log.error("worker.refused", problems=problems)
        print("qvq worker refused to start: " + "; ".join(problems), file=sys.stderr)
        raise SystemExit(2)  # bad settings, as the qvq command's exit codes say


@signals.worker_ready.connect
def _announce(**_: Any) -> None:
    from worker.context import get_context

    settings = get_settings()
    from worker.endpoint import probe

    get_context()  # connect to Redis, the store and the model endpoint now, not on the first task
    log.info("worker.ready", visibility_timeout_s=settings.visibility_timeout_s, task_timeout_s=settings.task_timeout_s,
             model_endpoint=settings.base_url, real_service=settings.uses_real_service, queue=settings.queue)
    problem = probe(settings)
    if problem:
        log.warning("worker.model_endpoint_unusable", model_endpoint=settings.base_url, problem=problem,
                    hint="tasks fail or retry until the endpoint answers GET /models")


@signals.celeryd_init.connect
def _log_early(**_: Any) -> None:
    """Configure logging before Celery writes its first line (the privileges warning, the banner)."""
    settings = get_settings()
    configure(settings.log_format, settings.log_level)
    if settings.log_format == "json":
        import celery.apps.worker

        celery.apps.worker.safe_say = _say_json  # type: ignore[assignment]


def _say_json(msg: str, f: Any = sys.__stderr__) -> None:
    """Celery's shutdown notices ("worker: Warm shutdown") as JSON lines; written directly, as Celery
    does, because they are said from a signal handler."""
    line = {"event": "worker.notice", "message": str(msg), "level": "info", "logger": "celery.apps.worker",
            "timestamp": dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")}
    print(json.dumps(line), file=f or sys.__stderr__, flush=True)


@signals.celeryd_after_setup.connect
def _quiet_banner(instance: Any = None, **_: Any) -> None:
    """With LOG_FORMAT=json every line is JSON: Celery's banner (plain text on stdout) becomes a log line."""
    if instance is None or get_settings().log_format != "json":
        return
    instance.quiet = True
    log.info("worker.starting", hostname=getattr(instance, "hostname", None),
             concurrency=getattr(instance, "concurrency", None), pool="threads",
             queues=sorted(instance.app.amqp.queues.keys()) if getattr(instance, "app", None) else None)


_health: dict[str, Any] = {}


@signals.worker_ready.connect
def _start_health(**_: Any) -> None:
    """The metrics endpoint and the heartbeat file (worker/health.py), once the worker consumes."""
    from worker.health import Heartbeat, serve_metrics

    settings = get_settings()
    if settings.heartbeat_file and "heartbeat" not in _health:
        _health["heartbeat"] = Heartbeat(settings.heartbeat_file).start()
    if "metrics" not in _health:
        _health["metrics"] = serve_metrics(settings.metrics_port)


@signals.worker_shutting_down.connect
def _stop_health(**_: Any) -> None:
    heartbeat = _health.pop("heartbeat", None)
    if heartbeat is not None:
        heartbeat.stop()  # not ready any more: a warm shutdown is finishing its streams


@signals.worker_shutdown.connect
def _close(**_: Any) -> None:
    from worker.context import close_context

    close_context()


@signals.worker_ready.connect
def _start_sweep(**_: Any) -> None:
    """Recovery from leases (worker/sweep.py): one daemon thread per worker process."""
    from contracts.job import message_for
    from worker import sweep
    from worker.context import get_context

    def send(task_id: str, run: int) -> None:
        app.send_task(TASK_NAME, args=[message_for(task_id, run)], task_id=task_id, queue=get_settings().queue)

    sweep.start(get_context(), send)


@signals.worker_shutting_down.connect
def _hand_back_at_shutdown(sig: str = "", how: str = "", **_: Any) -> None:
    """A warm shutdown (SIGTERM) lets running streams go on for QVQ_SHUTDOWN_GRACE_S, then stops them
    (nothing written) and frees their leases; each task's message goes back to the queue, so another
    worker resumes it at once instead of after the lease TTL or the visibility timeout."""
    from worker import sweep
    from worker.context import get_context

    sweep.stop()
    if how.lower() != "warm":
        return
    grace = get_settings().shutdown_grace_s
    leases = get_context().leases
    log.info("worker.shutting_down", signal=sig, grace_s=grace, running=leases.held())
    timer = threading.Timer(max(0.0, grace), leases.hand_back_all)
    timer.daemon = True
    timer.start()


@signals.task_revoked.connect
def _on_revoked(request: Any = None, expired: bool = False, **_: Any) -> None:
    """`celery control revoke TASK_ID`: the task is cancelled, like `qvq cancel`."""
    task_id = getattr(request, "id", None)
    if task_id:
        from worker.context import get_context
        from worker.tasks import cancel_revoked

        cancel_revoked(get_context(), task_id, expired=expired)


@signals.task_failure.connect
def _on_failure(task_id: str | None = None, exception: BaseException | None = None, **_: Any) -> None:
    log.info("celery.task_failure", task_id=task_id, error=str(exception), kind=type(exception).__name__)
