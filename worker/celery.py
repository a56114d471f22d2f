"""The Celery app and its configuration, and nothing else: it imports no other worker module.

    celery -A worker worker ...      (Celery finds `worker.celery.app`; `qvq worker` runs exactly this)

The app is created at import, cheaply, and configured lazily from the settings the first time its
configuration is read (`add_defaults` with a callable), so importing it reads no environment. Its
tasks (worker/tasks.py) and signal handlers (worker/lifecycle.py) are loaded by name (`include=`).

Delivery settings a minutes-long stream needs:
- acks_late + reject_on_worker_lost: a task whose worker dies is delivered again, not lost.
- prefetch multiplier 1: a worker reserves no more tasks than it has threads to run them.
- visibility timeout longer than the longest allowed task (checked when settings are read, and
  again against the broker's transport options when the worker starts: it refuses to start if they
  disagree), so a running stream is not handed to a second worker while the first is still on it;
  should it happen anyway, the task lease (worker/recovery/lease.py) keeps the second delivery from running.
- kombu's Redis transport brings back the messages of a dead worker only when a consumer sweeps the
  unacked set after the visibility timeout; the sweep period is set from the visibility timeout so a
  short one (tests, chaos drills) is honoured within seconds, not kombu's default ~100 s.
- the broker connection is retried forever (a worker outlives a Redis restart).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import redis
from celery import Celery
from kombu.transport import redis as kombu_redis

from contracts import callbacks as cb
from contracts.job import TASK_NAME
from contracts.redis_clients import celery_broker
from contracts.settings import Settings, get_settings


def restore_interval_s(visibility_timeout_s: int) -> int:
    """How often a worker sweeps for messages whose worker died (1..10 s, a quarter of the timeout)."""
    return max(1, min(10, visibility_timeout_s // 4))


def celery_config(settings: Settings) -> dict[str, Any]:
    broker_url, sentinel_options = celery_broker(settings.celery_broker_url)
    return {
        "broker_url": broker_url,
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
            **sentinel_options,  # Sentinel's master name, when the URL names one
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,  # a task that ended failed (FAILURE) is still acknowledged
        "task_default_queue": settings.queue,
        "task_routes": {TASK_NAME: {"queue": settings.queue}, cb.TASK_NAME: {"queue": cb.QUEUE}},
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
    original = kombu_redis.Channel._connparams
    if getattr(original, "_qvq_guarded", False):
        return

    def _connparams(self: Any, asynchronous: bool = False) -> Any:
        if self.connection is None or self.connection.client is None:
            raise redis.ConnectionError("the broker connection was closed")
        return original(self, asynchronous)  # type: ignore[no-untyped-call]

    _connparams._qvq_guarded = True  # type: ignore[attr-defined]
    kombu_redis.Channel._connparams = _connparams  # type: ignore[method-assign]


def create_app(settings: Settings | None = None) -> Celery:
    """The worker's app: configured from `settings`, or from the environment when first used."""
    guard_kombu_closed_transport()
    app = Celery("qvq", include=["worker.tasks", "worker.lifecycle"])
    app.add_defaults(lambda: celery_config(settings or get_settings()))
    return app



app = create_app()


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
