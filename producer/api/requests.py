"""Each API request's id, timing and metrics, in one ASGI middleware (the outermost).

- **X-Request-ID**: a caller's id is kept when it is 1-128 characters of `A-Za-z0-9._:-` (anything else
  is replaced, so a log line never carries a caller's arbitrary text); otherwise a new one (32 hex). It is
  echoed on the response and bound as `request_id` on every log line of the request, uvicorn's access
  line included; a valid `traceparent` header binds its `trace_id` too (with tracing on, the log
  processor puts the API's own span there: the same trace).
- **Access timing**: `duration_s` (request start to the response's headers) is bound while the response
  starts, which is when uvicorn writes its access line, in the same context.
- **Metrics** (contracts/metrics.py): `qvq_http_requests_total{route,method,status}`,
  `qvq_http_request_duration_seconds{route}` (to the response's end: an event stream counts its whole
  life) and `qvq_http_requests_in_flight`. `route` is the matched route's template
  (`/v1/tasks/{task_id}`), never the path, so ids do not reach a label; "unmatched" otherwise.
"""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from contracts import metrics as m
from contracts import tracing

REQUEST_ID_HEADER = "x-request-id"
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def request_id(scope: Scope) -> str:
    """The caller's X-Request-ID when it is safe to log and echo, else a new one."""
    for name, value in scope.get("headers") or ():
        if name == REQUEST_ID_HEADER.encode():
            text = value.decode("latin-1")
            if _REQUEST_ID.fullmatch(text):
                return str(text)
            break
    return uuid.uuid4().hex


def _headers(scope: Scope) -> dict[str, str]:
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in scope.get("headers") or ()
            if name in (b"traceparent", b"tracestate")}


def route_label(scope: Scope) -> str:
    """The template of the route that served the request, or "unmatched". FastAPI puts the route in the
    scope with its own path (without the prefix of the router that included it): the prefix is the part
    of the path before what the route's template matched."""
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if not isinstance(template, str):
        return m.UNMATCHED_ROUTE
    path = scope.get("path", "")
    params = scope.get("path_params") or {}
    matched = _PARAM.sub(lambda found: str(params.get(found.group(1), found.group(0))), template)
    return path.removesuffix(matched) + template if path.endswith(matched) else template


class RequestContext:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        rid = request_id(scope)
        status = [500]  # an app that raised before answering: the server answers 500

        async def observed_send(message: Message) -> None:
            if message["type"] != "http.response.start":
                await send(message)
                return
            status[0] = message["status"]
            message["headers"] = [*message.get("headers", ()), (REQUEST_ID_HEADER.encode(), rid.encode())]
            with structlog.contextvars.bound_contextvars(duration_s=round(time.perf_counter() - started, 6)):
                await send(message)

        m.HTTP_IN_FLIGHT.inc()
        carried = tracing.trace_id(tracing.carrier(_headers(scope)))
        try:
            with structlog.contextvars.bound_contextvars(request_id=rid, **({"trace_id": carried} if carried else {})):
                await self.app(scope, receive, observed_send)
        finally:
            m.HTTP_IN_FLIGHT.dec()
            route = route_label(scope)
            method = scope.get("method", "")
            m.HTTP_REQUESTS.labels(route, method if method in _METHODS else "other", str(status[0])).inc()
            m.HTTP_DURATION.labels(route).observe(time.perf_counter() - started)
