"""The worker's task metrics, read off the events it publishes (contracts/metrics.py defines them).

Every event of a task goes through the publisher, so one hook there sees a task start, retry and end
without the pipeline knowing about metrics. The model comes from the event's `model` field or from the
task's bound log context (`run_task` binds task_id and model); both are bounded by the catalogue.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from decimal import Decimal, InvalidOperation
from typing import Any

import structlog

from contracts import events as ev
from contracts import metrics as m

#: A started task not ended within this (the longest task limit plus margin) stops counting as active:
#: a delivery superseded by another worker ends without a terminal event here.
STALE_AFTER_S = 2 * 3600
#: Terminal events remembered per task id, so a terminal publish retried after a Redis error counts once.
RECENTLY_ENDED = 4096


class EventMetrics:
    """Updates the task metrics for each event a worker publishes; thread-safe."""

    def __init__(self, stale_after_s: float = STALE_AFTER_S) -> None:
        self.stale_after_s = stale_after_s
        self._lock = threading.Lock()
        self._started: dict[str, float] = {}  # task id -> monotonic start of this delivery
        self._ended: OrderedDict[str, None] = OrderedDict()
        m.ACTIVE_STREAMS.set_function(self.active)

    def active(self) -> int:
        now = time.monotonic()
        with self._lock:
            for task_id in [t for t, started in self._started.items() if now - started > self.stale_after_s]:
                del self._started[task_id]
            return len(self._started)

    def observe(self, task_id: str, type_: str, fields: dict[str, Any]) -> None:
        """Record one event about to be published (called in the publishing task's thread)."""
        if type_ == ev.STARTED:
            with self._lock:
                self._started.setdefault(task_id, time.monotonic())
                self._ended.pop(task_id, None)
        elif type_ == ev.RETRYING:
            m.MODEL_ATTEMPTS.labels(m.code_label((fields.get("error") or {}).get("code"))).inc()
        elif type_ in ev.TERMINAL_TYPES:
            self._terminal(task_id, type_, fields)

    def published(self, type_: str) -> None:
        counter = _PUBLISHED.get(type_)
        if counter is None:
            counter = m.EVENTS_PUBLISHED.labels("other")
        counter.inc()

    def _terminal(self, task_id: str, type_: str, fields: dict[str, Any]) -> None:
        with self._lock:
            if task_id in self._ended:
                return
            self._ended[task_id] = None
            while len(self._ended) > RECENTLY_ENDED:
                self._ended.popitem(last=False)
            started = self._started.pop(task_id, None)
        status = type_.removeprefix("task.")
        model = m.model_label(fields.get("model") or structlog.contextvars.get_contextvars().get("model"))
        m.TASKS.labels(status, model).inc()
        if started is not None:
            m.TASK_DURATION.labels(status).observe(time.monotonic() - started)
        if type_ == ev.COMPLETED:
            _completed(model, fields)
        elif type_ == ev.FAILED:
            code = (fields.get("error") or {}).get("code")
            m.TASK_FAILURES.labels(m.code_label(code)).inc()
            if isinstance(code, str) and code.startswith("model."):  # the model call failed, not the images
                m.MODEL_ATTEMPTS.labels(m.code_label(code)).inc()


def _completed(model: str, fields: dict[str, Any]) -> None:
    m.MODEL_ATTEMPTS.labels(m.OK).inc()
    usage = fields.get("usage") or {}
    for kind in m.TOKEN_KINDS:
        tokens = usage.get(f"{kind}_tokens")
        if isinstance(tokens, int | float) and tokens > 0:
            m.TOKENS.labels(model, kind).inc(tokens)
    total = _amount((fields.get("cost") or {}).get("total"))
    if total > 0:
        m.COST.labels(model).inc(total)
    timings = fields.get("timings") or {}
    for kind in m.FIRST_TOKEN_KINDS:
        seconds = timings.get(f"first_{kind}_s")
        if isinstance(seconds, int | float):
            m.FIRST_TOKEN.labels(kind).observe(seconds)


def _amount(value: Any) -> float:
    """A cost amount as the event carries it (an exact decimal string), as a float for a counter."""
    try:
        return float(Decimal(str(value))) if value is not None else 0.0
    except (InvalidOperation, ValueError):
        return 0.0


EVENT_METRICS = EventMetrics()  # the process's one recorder (the gauge reads it at scrape time)

#: One counter child per event type, looked up once (a delta is published many times a second).
_PUBLISHED = {type_: m.EVENTS_PUBLISHED.labels(type_) for type_ in ev.EVENT_TYPES}
