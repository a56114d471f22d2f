"""Every Prometheus metric the service exports, defined once (README, "Listing, usage and metrics").

| metric | type | labels | recorded by |
|---|---|---|---|
| qvq_tasks_total | counter | status (completed, failed, cancelled), model | worker, from its terminal events |
| qvq_task_duration_seconds | histogram | status | worker: task.started to the terminal event of one delivery |
| qvq_first_token_seconds | histogram | kind (reasoning, answer) | worker: from task.completed's timings |
| qvq_tokens_total | counter | model, kind (prompt, completion) | worker: task.completed's usage |
| qvq_cost_cny_total | counter | model | worker: task.completed's cost |
| qvq_model_attempts_total | counter | code ("ok" or an error code) | worker: task.retrying, task.completed, task.failed (model.* codes) |
| qvq_active_streams | gauge | - | worker: tasks started and not yet ended in this process |
| qvq_queue_depth | gauge | queue (the task queue and the callbacks queue) | API, read from the broker at scrape time (LLEN of the queue and kombu's priority lists) |
| qvq_queue_oldest_age_seconds | gauge | queue | API, at scrape time: how long the queue's oldest message has waited (0 when empty) |
| qvq_flow_wait_seconds | histogram | reason (model_quota, tenant_concurrency, tenant_rate) | flow control: observed when a held-back task's wait ends (worker/flow.py) |
| qvq_events_published_total | counter | type (the event type) | worker: every event its publisher sent to Redis |
| qvq_task_failures_total | counter | code (the error code) | worker: task.failed, by its code (budget.exceeded, image.*, model.*...) |
| qvq_callback_tries_total | counter | outcome (delivered, retry, gone, refused) | worker: every callback POST tried |
| qvq_http_requests_total | counter | route (the route's template), method, status | API: every answered request |
| qvq_http_request_duration_seconds | histogram | route | API: request start to the response's end |
| qvq_http_requests_in_flight | gauge | - | API: requests started and not yet answered |

Labels are bounded: a model outside the catalogue becomes "other", an unknown error code "internal", a
path no route matched "unmatched"; task ids never appear in a label. Each process exports only its own
families, from its own registry (with the process, platform and GC collectors): the worker's
(`WORKER_REGISTRY`) on QVQ_METRICS_PORT, the API's (`API_REGISTRY`) at GET /metrics. Nothing is put in
prometheus_client's default registry, so a process that only imports the package (Flower) shows none.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from contracts import broker
from contracts.catalog import MODELS
from contracts.errors import ERROR_CODES
from contracts.logging import get_logger

log = get_logger(__name__)
STATUSES = ("completed", "failed", "cancelled")
TOKEN_KINDS = ("prompt", "completion")
FIRST_TOKEN_KINDS = ("reasoning", "answer")
OK = "ok"
OTHER_MODEL = "other"

#: Minutes-long reasoning streams under a 1,800 s limit (QVQ_TASK_TIMEOUT_S).
DURATION_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600)
FIRST_TOKEN_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 10, 20, 30, 60, 120)
WAIT_BUCKETS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)  # an event stream is long
UNMATCHED_ROUTE = "unmatched"


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


WORKER_REGISTRY = _registry()
API_REGISTRY = _registry()

TASKS = Counter("qvq_tasks", "Tasks that reached a terminal state, by status and model.", ["status", "model"],
                registry=WORKER_REGISTRY)
TASK_DURATION = Histogram("qvq_task_duration_seconds", "From task.started to the terminal event of a delivery.",
                          ["status"], buckets=DURATION_BUCKETS, registry=WORKER_REGISTRY)
FIRST_TOKEN = Histogram("qvq_first_token_seconds", "From task.started to the first reasoning or answer text.",
                        ["kind"], buckets=FIRST_TOKEN_BUCKETS, registry=WORKER_REGISTRY)
TOKENS = Counter("qvq_tokens", "Tokens billed for completed tasks, by model and kind.", ["model", "kind"],
                 registry=WORKER_REGISTRY)
COST = Counter("qvq_cost_cny", "Cost of completed tasks in CNY, by model.", ["model"], registry=WORKER_REGISTRY)
MODEL_ATTEMPTS = Counter("qvq_model_attempts", "Model calls by outcome: ok, or the error code that ended them.",
                         ["code"], registry=WORKER_REGISTRY)
ACTIVE_STREAMS = Gauge("qvq_active_streams", "Tasks this worker process runs now (started, not yet ended).",
                       registry=WORKER_REGISTRY)
FLOW_WAIT = Histogram("qvq_flow_wait_seconds", "Time a task was held back by flow control, by reason.",
                      ["reason"], buckets=WAIT_BUCKETS, registry=WORKER_REGISTRY)
EVENTS_PUBLISHED = Counter("qvq_events_published", "Events written to Redis (pub/sub + replay log), by type.",
                           ["type"], registry=WORKER_REGISTRY)
TASK_FAILURES = Counter("qvq_task_failures", "Tasks that ended failed, by error code.", ["code"],
                        registry=WORKER_REGISTRY)
CALLBACK_TRIES = Counter("qvq_callback_tries", "Callback POSTs tried, by outcome.", ["outcome"],
                         registry=WORKER_REGISTRY)

HTTP_REQUESTS = Counter("qvq_http_requests", "API requests answered, by route template, method and status.",
                        ["route", "method", "status"], registry=API_REGISTRY)
HTTP_DURATION = Histogram("qvq_http_request_duration_seconds", "API request start to the end of its response.",
                          ["route"], buckets=HTTP_BUCKETS, registry=API_REGISTRY)
HTTP_IN_FLIGHT = Gauge("qvq_http_requests_in_flight", "API requests started and not yet answered.",
                       registry=API_REGISTRY)

QUEUE_DEPTH_NAME = "qvq_queue_depth"
QUEUE_AGE_NAME = "qvq_queue_oldest_age_seconds"

#: The names a dashboard or alert may use (the exported sample names of every metric above), by process.
WORKER_METRIC_NAMES = frozenset({
    "qvq_tasks_total", "qvq_task_duration_seconds", "qvq_first_token_seconds", "qvq_tokens_total",
    "qvq_cost_cny_total", "qvq_model_attempts_total", "qvq_active_streams", "qvq_flow_wait_seconds",
    "qvq_events_published_total", "qvq_task_failures_total", "qvq_callback_tries_total",
})
API_METRIC_NAMES = frozenset({
    QUEUE_DEPTH_NAME, QUEUE_AGE_NAME, "qvq_http_requests_total", "qvq_http_request_duration_seconds", "qvq_http_requests_in_flight",
})
METRIC_NAMES = WORKER_METRIC_NAMES | API_METRIC_NAMES


Check = Callable[[], str | None]  # None: healthy; else what is wrong (answered 503)


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the stdlib's name)
        """Scrapes and probes are not logged."""


def serve_registry(registry: CollectorRegistry, port: int, host: str = "0.0.0.0",
                   checks: dict[str, Check] | None = None) -> Any:
    """Serve a registry on its own port from a daemon thread (the worker's, or the API's when
    QVQ_API_METRICS_PORT is set), and each of `checks` at its path (200 "ok", or 503 and its problem);
    the server (`shutdown()`, `server_close()`), or None when the port is 0 or taken (logged, never fatal)."""
    if not port:
        return None
    app = _with_checks(make_wsgi_app(registry), checks or {})
    try:
        server = make_server(host, port, app, _Server, handler_class=_QuietHandler)
    except OSError as exc:
        log.warning("metrics.unavailable", port=port, error=str(exc))
        return None
    threading.Thread(target=server.serve_forever, name="qvq-metrics", daemon=True).start()
    log.info("metrics.serving", port=port)
    return server


def _with_checks(metrics: Any, checks: dict[str, Check]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        check = checks.get(environ.get("PATH_INFO", ""))
        if check is None:
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        problem = check()
        start_response("200 OK" if problem is None else "503 Service Unavailable",
                       [("Content-Type", "text/plain; charset=utf-8")])
        return [(problem or "ok").encode() + b"\n"]

    return app


def model_label(name: Any) -> str:
    return name if isinstance(name, str) and name in MODELS else OTHER_MODEL


def code_label(code: Any) -> str:
    if code == OK:
        return OK
    return code if isinstance(code, str) and code in ERROR_CODES else "internal"


def status_label(status: str) -> str:
    return status if status in STATUSES else "failed"


# -- queue depth, read from the broker at scrape time ------------------------------------------------
class QueueDepthCollector(Collector):
    """qvq_queue_depth{queue} and qvq_queue_oldest_age_seconds{queue}, read from the broker when
    Prometheus scrapes (LLEN, and LINDEX of each list's oldest message).

    `use` gives it the broker's Redis client; a broker that does not answer yields no sample rather than
    a wrong one.
    """

    def __init__(self, queues: Iterable[str]) -> None:
        self.queues = tuple(queues)
        self._lock = threading.Lock()
        self._client: Any = None

    def use(self, client: Any) -> None:
        with self._lock:
            self._client = client

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield from self._families()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth, age = self._families()
        with self._lock:
            client = self._client
        if client is not None:
            now = time.time()
            for queue in self.queues:
                read = _read(client, queue, now)
                if read is not None:
                    depth.add_metric([queue], read[0])
                    age.add_metric([queue], read[1])
        yield depth
        yield age

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, GaugeMetricFamily]:
        return (GaugeMetricFamily(QUEUE_DEPTH_NAME, "Messages waiting in the broker queue.", labels=["queue"]),
                GaugeMetricFamily(QUEUE_AGE_NAME, "Seconds the queue's oldest waiting message has waited.",
                                  labels=["queue"]))


def _read(client: Any, queue: str, now: float) -> tuple[int, float] | None:
    try:
        return broker.depth(client, queue), broker.oldest_age(client, queue, now)
    except Exception:  # a scrape must not fail because the broker is down; the samples are absent
        return None


_queue_depth: QueueDepthCollector | None = None
_queue_depth_lock = threading.Lock()


def queue_depth_collector(queues: Iterable[str]) -> QueueDepthCollector:
    """The process's one queue-depth collector, registered on the API's registry the first time."""
    global _queue_depth
    with _queue_depth_lock:
        if _queue_depth is None:
            _queue_depth = QueueDepthCollector(queues)
            API_REGISTRY.register(_queue_depth)
        return _queue_depth
