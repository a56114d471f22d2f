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

from collections.abc import Mapping
from typing import Any

from celery import Celery, signals

from contracts.job import QUEUE, TASK_NAME
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
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}, "qvq.callback": {"queue": "qvq-callbacks"}},
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
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
    problems = delivery_problems(conf, settings)
    if problems:
        log.error("worker.refused", problems=problems)
        raise SystemExit("qvq worker refused to start: " + "; ".join(problems))


@signals.worker_ready.connect
def _announce(**_: Any) -> None:
    from worker.context import get_context

    settings = get_settings()
    get_context()  # connect to Redis, the store and the model endpoint now, not on the first task
    log.info("worker.ready", visibility_timeout_s=settings.visibility_timeout_s, task_timeout_s=settings.task_timeout_s,
             model_endpoint=settings.base_url, real_service=settings.uses_real_service)


@signals.worker_shutdown.connect
def _close(**_: Any) -> None:
    from worker.context import close_context

    close_context()
