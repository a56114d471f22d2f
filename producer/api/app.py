"""The HTTP API app: built by `create_app`, its services by the lifespan.

    qvq api --port 8000                     # or: uvicorn --factory producer.api:create_app

Every /v1/ request is authenticated (security.py) before its body is read, and acts as the tenant of
its key: another tenant's task answers exactly like a missing one. Errors are
{"error": {"code", "message", "field"}} (errors.py) and never show an internal address or a secret.
Routes call the service layer (producer/service/); blocking calls run in the server's thread pool (short
ones), the event streams on its event loop, so a connected viewer costs a coroutine, never a thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse
from starlette.concurrency import run_in_threadpool

from contracts import tracing
from contracts.logging import redact_logger
from contracts.settings import Settings, get_settings
from contracts.store import Store
from contracts.tenants import KeyRing
from contracts.uploads import UploadStorage
from producer.aio import AsyncClient
from producer.api import batches, errors, events, openapi, ops, reports, tasks, uploads, webhooks
from producer.api.deps import AppServices
from producer.api.fanout import FanoutHub
from producer.api.page import viewer_page
from producer.api.requests import RequestContext
from producer.api.responses import JSONResponse
from producer.api.security import Authenticator, LoopbackOnly, SecurityHeaders, page_policy
from producer.service import Services
from producer.service.revokes import RevokeListener


def create_app(settings: Settings | None = None, *, keepalive_s: float = events.KEEPALIVE_S,
               upload_dir: str | Path | None = None) -> FastAPI:
    """The API app. `keepalive_s`: seconds between SSE keep-alive comments; `upload_dir`: a local
    directory for uploads instead of QVQ_UPLOAD_URL (tests, a single host)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = await run_in_threadpool(Store.from_url, settings.database_url)
        storage = UploadStorage(settings, directory=upload_dir)
        services = await run_in_threadpool(Services.build, settings, store=store, storage=storage)
        api = AppServices(settings, services, AsyncClient(settings, store=store), FanoutHub(settings.redis_url),
                          keepalive_s)
        app.state.services = api
        sweeper = asyncio.create_task(uploads.sweep_uploads(api))
        revokes = RevokeListener(services.tasks.sender.app, services.tasks.cancel_revoked).start()
        app.state.revokes = revokes
        metrics = ops.serve_metrics(settings)
        try:
            yield
        finally:
            if metrics is not None:
                metrics.shutdown()
                metrics.server_close()
            revokes.stop()
            sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await sweeper
            await api.fanout.aclose()
            await api.aclient.aclose()
            await run_in_threadpool(services.close)

    app = FastAPI(title="qvq-queue", version="1", lifespan=lifespan, docs_url="/docs", redoc_url=None,
                  default_response_class=JSONResponse, generate_unique_id_function=openapi.operation_id)
    app.state.authenticator = Authenticator(KeyRing.parse(settings.api_keys))
    errors.install(app)
    redact_logger("uvicorn.access")  # ?api_key= never reaches the access log
    for module in (tasks, uploads, events, reports, webhooks, batches):
        app.include_router(module.router, prefix="/v1")
    ops.install(app, settings)
    page = viewer_page()
    _install_middleware(app, settings, page)
    if tracing.setup(settings, "qvq-api"):  # OTEL_* names an exporter: FastAPI's server spans, outermost
        tracing.instrument_app(app)
    app.openapi = lambda: openapi.document(app)  # type: ignore[method-assign]

    @app.get("/", include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    return app


def _install_middleware(app: FastAPI, settings: Settings, page: str) -> None:
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type",
                                                                         "Last-Event-ID"])
    if not settings.api_keys and not settings.api_insecure:
        app.add_middleware(LoopbackOnly)
    app.add_middleware(SecurityHeaders, page_csp=page_policy(page))
    app.add_middleware(RequestContext)  # the outermost: it counts and times every request, refused ones too
