"""The API's operational routes: probes and metrics, outside /v1 and without API keys.

| method + path | does |
|---|---|
| GET /livez | 200 while the process answers; checks nothing else (a Redis blip must not restart API pods) |
| GET /readyz | 200 when Redis and the database answer within READY_TIMEOUT_S, else 503 with what failed |
| GET /metrics | Prometheus text: this process's metrics and the queues read from the broker (on QVQ_API_METRICS_PORT instead, when set) |
| GET /healthz | as /readyz, answered {"status": "ok" | "degraded"} (kept for existing probes) |

`install(app, settings)` adds them. /metrics shows the API's own families (contracts/metrics.py,
API_REGISTRY): its requests (producer/api/requests.py) and the depth of every queue.
"""

from __future__ import annotations

import threading
from typing import Any

import anyio
import redis
import sqlalchemy as sa
from fastapi import APIRouter, FastAPI
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy.pool import NullPool
from starlette.concurrency import run_in_threadpool

from contracts import callbacks as cb
from contracts.logging import get_logger
from contracts.metrics import API_REGISTRY, queue_depth_collector, serve_registry
from contracts.redis_clients import async_client, sync_client
from contracts.settings import Settings
from producer.api.responses import JSONResponse

log = get_logger(__name__)

READY_TIMEOUT_S = 3.0


def install(app: FastAPI, settings: Settings) -> None:
    """Add /livez, /readyz and /metrics to the app (/metrics only when QVQ_API_METRICS_PORT does not
    move the metrics to a port of their own: `serve_metrics`)."""
    probes = _Probes(settings)
    app.include_router(router(probes, metrics_here=not settings.api_metrics_port))
    queue_depth_collector([settings.queue, cb.QUEUE]).use(probes.broker())


def serve_metrics(settings: Settings) -> Any:
    """The API's metrics on QVQ_API_METRICS_PORT (a daemon thread); the server to shut down, or None."""
    return serve_registry(API_REGISTRY, settings.api_metrics_port)


def router(probes: _Probes, *, metrics_here: bool = True) -> APIRouter:
    routes = APIRouter(tags=["ops"])

    @routes.get("/livez")
    async def livez() -> dict[str, str]:
        return {"status": "ok"}

    @routes.get("/readyz")
    async def readyz() -> JSONResponse:
        checks = await probes.check()
        ready = all(checks.values())
        return JSONResponse({"status": "ready" if ready else "not_ready", **checks},
                            status_code=200 if ready else 503)

    @routes.get("/healthz", include_in_schema=False)
    async def healthz() -> JSONResponse:
        checks = await probes.check()
        healthy = all(checks.values())
        return JSONResponse({"status": "ok" if healthy else "degraded", **checks},
                            status_code=200 if healthy else 503)

    if metrics_here:
        @routes.get("/metrics", response_class=Response, responses={200: {
            "description": "Prometheus text exposition format",
            "content": {"text/plain": {"schema": {"type": "string"}}}}})
        async def metrics() -> Response:
            body = await run_in_threadpool(generate_latest, API_REGISTRY)
            return Response(body, media_type=CONTENT_TYPE_LATEST)

    return routes


class _Probes:
    """Connections of the probes' own, so a readiness check never waits behind the API's pools."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._engine: sa.Engine | None = None
        self._lock = threading.Lock()

    async def check(self) -> dict[str, bool]:
        """Whether Redis and the database answer, each within READY_TIMEOUT_S."""
        return {"redis": await _within(self.ping_redis()),
                "database": await _within(run_in_threadpool(self.ping_database))}

    async def ping_redis(self) -> None:
        client = async_client(self.settings.redis_url, socket_connect_timeout=READY_TIMEOUT_S,
                                         socket_timeout=READY_TIMEOUT_S)
        try:
            await client.ping()
        finally:
            await client.aclose()

    def ping_database(self) -> None:
        with self._lock:
            if self._engine is None:  # NullPool: no connection is kept between probes
                self._engine = sa.create_engine(self.settings.database_url, poolclass=NullPool)
        with self._engine.connect() as conn:
            conn.execute(sa.text("select 1"))

    def broker(self) -> redis.Redis:
        """The broker client the queue-depth collector reads (connects on the first scrape)."""
        return sync_client(self.settings.celery_broker_url, socket_connect_timeout=2, socket_timeout=2)


async def _within(awaitable: Any) -> bool:
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            await awaitable
        return True
    except Exception as exc:
        log.warning("readyz.check_failed", error=type(exc).__name__)
        return False
