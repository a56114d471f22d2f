"""The Celery app: Redis broker, JSON only, and the delivery settings a minutes-long stream needs.

- acks_late + reject_on_worker_lost: a task whose worker dies is delivered again, not lost.
- prefetch multiplier 1: a worker reserves no more tasks than it has threads to run them.
- visibility timeout longer than the longest allowed task (checked when settings are read), so a
  running stream is never handed to a second worker while the first is still on it.
"""

from __future__ import annotations

from typing import Any

from celery import Celery, signals

from contracts.job import QUEUE, TASK_NAME
from contracts.logging import configure, get_logger
from contracts.settings import Settings, get_settings

log = get_logger(__name__)


def celery_config(settings: Settings) -> dict[str, Any]:
    return {
        "broker_url": settings.celery_broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_pool_limit": settings.worker_concurrency + 10,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            "max_connections": settings.worker_concurrency + 20,
            "socket_keepalive": True,
            "health_check_interval": 25,
        },
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_default_queue": QUEUE,
        "task_routes": {TASK_NAME: {"queue": QUEUE}},
        "worker_prefetch_multiplier": 1,
        "worker_pool": "threads",
        "worker_concurrency": settings.worker_concurrency,
        "worker_hijack_root_logger": False,
        "worker_send_task_events": False,
        "worker_cancel_long_running_tasks_on_connection_loss": False,
        "enable_utc": True,
    }


def create_app(settings: Settings | None = None) -> Celery:
    settings = settings or get_settings()
    app = Celery("qvq", include=["worker.tasks"])
    app.conf.update(celery_config(settings))
    return app


app = create_app()


@signals.setup_logging.connect
def _setup_logging(**_: Any) -> None:
    settings = get_settings()
    configure(settings.log_format, settings.log_level)


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
