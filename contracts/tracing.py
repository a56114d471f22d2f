"""Trace context (design.md, "Trace context"), with OpenTelemetry.

A W3C `traceparent` (and `tracestate`) received by the API (its headers) or given to the Python client
(an argument, or the caller's current span) rides in the task: the row's request keeps it (`trace`), and
the worker continues it. A run is one span, `qvq.run`, with a span for each step: `qvq.images` (fetch and
validate), `qvq.model_call` (its HTTP request carries the traceparent to the model service),
`qvq.persist`, `qvq.publish` (the terminal event); the kept instrumentations add FastAPI's server spans,
Celery's, httpx's (the model call, image fetches, callbacks), redis' and SQLAlchemy's.

On when an exporter is named: OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or
OTEL_TRACES_EXPORTER (`otlp`, `console`); OTEL_SDK_DISABLED=true turns it off. The SDK reads every other
OTEL_* variable itself (service name, headers, sampler). Off, nothing is instrumented and the API's
no-op tracer is all that runs; the carried traceparent still rides in the task, names `trace_id` on log
lines, and is forwarded to the model service as it came, so a trace the caller started is not cut.
"""

from __future__ import annotations

import contextlib
import functools
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ParamSpec, TypeVar

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from contracts.errors import RequestError
from contracts.logging import get_logger, span_fields
from contracts.settings import Settings

log = get_logger(__name__)
P = ParamSpec("P")
T = TypeVar("T")
Carrier = dict[str, str]  # {"traceparent": ..., "tracestate"?: ...}

_TRACEPARENT = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_TRACESTATE = re.compile(r"[\x20-\x7e]{1,512}")
_tracer = trace.get_tracer("qvq-queue")
_setup_lock = threading.Lock()
_provider: Any = None


def enabled(settings: Settings) -> bool:
    exporter = settings.otel_traces_exporter.strip().lower()
    named = bool(settings.otel_endpoint or settings.otel_traces_endpoint or (exporter and exporter != "none"))
    return named and not settings.otel_sdk_disabled


def carrier(headers: Mapping[str, str] | None) -> Carrier | None:
    """A valid traceparent (and its tracestate) from request headers or a dict; None otherwise."""
    if not headers:
        return None
    parent = (headers.get("traceparent") or "").strip().lower()
    match = _TRACEPARENT.fullmatch(parent)
    if match is None or set(match.group(1)) == {"0"} or set(match.group(2)) == {"0"}:
        return None
    found: Carrier = {"traceparent": parent}
    state = (headers.get("tracestate") or "").strip()
    if state and _TRACESTATE.fullmatch(state):
        found["tracestate"] = state
    return found


def given(fields: dict[str, Any]) -> Carrier | None:
    """`traceparent=` / `tracestate=` given to a Python client's submit (taken out of the job's fields), else
    the caller's current span; RequestError for a traceparent that is not W3C's."""
    parent, state = fields.pop("traceparent", None), fields.pop("tracestate", None)
    if parent is None:
        return current()
    found = carrier({"traceparent": parent, "tracestate": state or ""}) if isinstance(parent, str) else None
    if found is None:
        raise RequestError("traceparent is not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)", field="traceparent")
    return found


def current() -> Carrier | None:
    """The caller's current span as a carrier (None when there is none)."""
    injected: Carrier = {}
    propagate.inject(injected)
    return carrier(injected)


def trace_id(found: Carrier | None) -> str | None:
    return found["traceparent"].split("-")[1] if found else None


def outgoing(fallback: Carrier | None) -> Carrier:
    """Headers for an outbound call: the current span's context, or the carried one as it came."""
    return current() or fallback or {}


@contextlib.contextmanager
def continued(found: Carrier | None, name: str, **attributes: Any) -> Iterator[Any]:
    """A span `name` continuing the carried trace (a new trace when none was carried)."""
    token = otel_context.attach(propagate.extract(found)) if found else None
    try:
        with _tracer.start_as_current_span(name, attributes=_attributes(attributes)) as span:
            yield span
    finally:
        if token is not None:
            otel_context.detach(token)


def span(name: str, **attributes: Any) -> contextlib.AbstractContextManager[Any]:
    """A child span of the current one."""
    return _tracer.start_as_current_span(name, attributes=_attributes(attributes))


def spanned(name: str) -> Callable[[Callable[P, T]], Callable[P, T]]:
    """A function run in a child span `name`."""
    def wrap(function: Callable[P, T]) -> Callable[P, T]:
        @functools.wraps(function)
        def run(*args: P.args, **kwargs: P.kwargs) -> T:
            with _tracer.start_as_current_span(name):
                return function(*args, **kwargs)

        return run

    return wrap


def log_fields(current_span: Any, found: Carrier | None) -> dict[str, str]:
    """`trace_id` for log lines: the span's (tracing on), else the carried one's; nothing without either."""
    known = span_fields(current_span).get("trace_id") or trace_id(found)
    return {"trace_id": known} if known else {}


def _attributes(values: dict[str, Any]) -> dict[str, Any]:
    return {f"qvq.{key}": value for key, value in values.items() if isinstance(value, str | int | float | bool)}


def setup(settings: Settings, service_name: str) -> bool:
    """Configure the process's tracer provider and the library instrumentations once, when enabled."""
    global _provider
    if not enabled(settings):
        return False
    with _setup_lock:
        if _provider is not None:
            return True
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        resource = Resource.create()  # OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES win over our default name
        if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": service_name}))
        provider = TracerProvider(resource=resource)
        provider.add_span_processor(BatchSpanProcessor(_exporter(settings)))
        trace.set_tracer_provider(provider)
        _instrument_libraries()
        _provider = provider
    log.info("tracing.on", service=service_name)
    return True


def instrument_app(app: Any) -> None:
    """FastAPI's server spans for the API app (tracing on)."""
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls="livez,readyz,healthz,metrics")


def shutdown() -> None:
    """Export what is buffered (at a process's end)."""
    if _provider is not None:
        _provider.shutdown()


def _exporter(settings: Settings) -> Any:
    if settings.otel_traces_exporter.strip().lower() == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    return OTLPSpanExporter()  # the endpoint, headers and timeout from OTEL_EXPORTER_OTLP_*


def _instrument_libraries() -> None:
    from opentelemetry.instrumentation.celery import CeleryInstrumentor
    from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor
    from opentelemetry.instrumentation.redis import RedisInstrumentor
    from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

    for instrumentor in (CeleryInstrumentor(), HTTPXClientInstrumentor(), RedisInstrumentor(),  # type: ignore[no-untyped-call]
                         SQLAlchemyInstrumentor()):
        if not instrumentor.is_instrumented_by_opentelemetry:
            instrumentor.instrument()
