"""Logging, configured in one place: structlog, JSON in production or console for people.

Logs are data: with LOG_FORMAT=json every line is one JSON object, whoever wrote it.
- Our own lines carry their fields (task_id and model are bound per task by the worker).
- Celery's lines get `task_id` and `task_name` as fields: from the record's arguments ("Task %(name)s[%(id)s]
  received/succeeded") or, inside a task, from Celery's current task.
- uvicorn's access lines become `http.access` with method, path, status, client,
  http_version, and duration_s and request_id, which the API binds per request (producer/api/requests.py).
- Python warnings go through logging too (`py.warnings`), and so does an exception that ends a
  background thread (`thread.crashed`), which Python would otherwise print to stderr as plain text.
- Private request content (prompt, metadata, messages) is dropped from any line above DEBUG.
- Every string of every line goes through contracts/redaction.py: URLs lose their query, fragment and
  credentials, secret-looking parameters (`api_key`, `api%5Fkey`, `token`...) and bearer tokens are masked.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import MutableMapping
from typing import Any

import structlog
from opentelemetry import trace as otel_trace

from contracts.redaction import redact

#: Fields that may hold what a user sent us; never logged above DEBUG.
PRIVATE_FIELDS = ("prompt", "metadata", "messages")
EventDict = MutableMapping[str, Any]
#: Fields written as they are: the SNS SubscribeURL an operator must visit to confirm a subscription.
UNREDACTED_FIELDS = frozenset({"subscribe_url"})


def configure(log_format: str = "console", level: str = "INFO") -> None:
    """Route structlog and the standard library (Celery, uvicorn) through one renderer on stderr."""
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if log_format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_trace_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, access_fields, celery_task_fields, drop_positional_args],
        pass_foreign_args=True,  # the processors below read a foreign record's arguments
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, drop_private,
                    structlog.processors.format_exc_info, redact_values, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)
    threading.excepthook = _log_thread_crash  # a background thread's traceback is a log line too
    for noisy in ("httpx", "httpcore", "botocore", "boto3", "urllib3", "openai", "alembic.runtime.plugins"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def _library_default() -> None:
    """Before a process calls `configure` (a program that only imports the client, a test), our lines go
    to the standard library's logging, whose defaults show warnings on stderr and drop the rest: never
    structlog's default of printing every line to stdout, which would mix into a command's output."""
    if not structlog.is_configured():
        structlog.configure(processors=[structlog.contextvars.merge_contextvars, add_trace_ids,
                                        structlog.dev.ConsoleRenderer(colors=False)],
                            logger_factory=structlog.stdlib.LoggerFactory(),
                            wrapper_class=structlog.stdlib.BoundLogger)


class RedactedArgs(logging.Filter):
    """Masks secrets in a standard-library record's arguments (uvicorn's access line carries the path)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def redact_logger(name: str) -> None:
    """Install RedactedArgs on a logger, once."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, RedactedArgs) for f in logger.filters):
        logger.addFilter(RedactedArgs())


# -- processors (plain functions: logger, method name, event dict) ------------------------------------
def span_fields(span: Any) -> dict[str, str]:
    """A recording span's `trace_id` and `span_id` (hex), {} for the no-op span of tracing off."""
    context = span.get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


def add_trace_ids(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """`trace_id` and `span_id` of the current OpenTelemetry span, when one records (tracing on)."""
    event_dict.update(span_fields(otel_trace.get_current_span()))
    return event_dict


def access_fields(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """uvicorn's access line ('%s - "%s %s HTTP/%s" %d') as fields."""
    record = event_dict.get("_record")
    if record is None or record.name != "uvicorn.access":
        return event_dict
    args = event_dict.get("positional_args")
    if isinstance(args, tuple) and len(args) == 5:
        client, method, path, http_version, status = args
        event_dict.update(event="http.access", client=client, method=method, path=redact(str(path)),
                          http_version=http_version, status=status)
    else:
        event_dict["event"] = redact(str(event_dict.get("event", "")))
    return event_dict


def celery_task_fields(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """task_id and task_name on Celery's own lines (and any foreign line written inside a task)."""
    if "task_id" in event_dict:
        return event_dict
    record = event_dict.get("_record")
    args = event_dict.get("positional_args")
    if isinstance(args, dict) and isinstance(args.get("id"), str) and getattr(record, "name", "").startswith("celery"):
        event_dict["task_id"] = args["id"]
        if isinstance(args.get("name"), str):
            event_dict["task_name"] = args["name"]
        return event_dict
    task = _current_celery_task()
    if task is not None:
        event_dict["task_id"] = task.request.id
        event_dict["task_name"] = task.name
    return event_dict


def drop_positional_args(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    event_dict.pop("positional_args", None)
    return event_dict


def redact_values(_logger: Any, _method: str, event_dict: EventDict) -> EventDict:
    """Every string of every line through contracts/redaction.py (URLs' queries and credentials, keys)."""
    for name, value in event_dict.items():
        if isinstance(value, str) and name not in UNREDACTED_FIELDS:
            event_dict[name] = redact(value)
    return event_dict


def drop_private(_logger: Any, method: str, event_dict: EventDict) -> EventDict:
    if method != "debug" and event_dict.get("level") != "debug":
        for name in PRIVATE_FIELDS:
            event_dict.pop(name, None)
    return event_dict


def _current_celery_task() -> Any:
    state = sys.modules.get("celery._state")  # never import Celery for this: the API may not use it
    if state is None:
        return None
    task = state.get_current_task()
    if task is None or getattr(task.request, "id", None) is None:
        return None
    return task


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    get_logger("qvq.threads").error("thread.crashed", thread_name=getattr(args.thread, "name", None),
                                    exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


_library_default()
