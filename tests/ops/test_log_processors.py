"""The logging processors of contracts/logging.py, one by one, on hand-made records."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from contracts.logging import access_fields, celery_task_fields, drop_private, redact


def _foreign(name: str, msg: str, args: Any) -> dict[str, Any]:
    record = logging.LogRecord(name, logging.INFO, __file__, 1, msg, None, None)
    return {"event": msg, "_record": record, "positional_args": args}


def test_celery_trace_lines_get_the_task_id_and_name_from_their_arguments() -> None:
    line = _foreign("celery.app.trace", "Task %(name)s[%(id)s] succeeded", {"id": "t-1", "name": "qvq.reason"})
    assert dict(celery_task_fields(None, "info", line)) == {**line, "task_id": "t-1", "task_name": "qvq.reason"}


def test_a_foreign_line_inside_a_task_gets_the_current_task() -> None:
    app = Celery("probe", set_as_current=False)

    @app.task(name="probe.task", bind=True)
    def probe(self: Any) -> dict[str, Any]:
        return dict(celery_task_fields(None, "warning", _foreign("httpx", "slow", ())))

    fields = probe.apply(task_id="t-2").get()
    assert (fields["task_id"], fields["task_name"]) == ("t-2", "probe.task")


def test_a_line_outside_any_task_is_left_alone() -> None:
    line = _foreign("sqlalchemy", "connected", ())
    assert "task_id" not in celery_task_fields(None, "info", line)
    assert celery_task_fields(None, "info", {"event": "x", "task_id": "own"})["task_id"] == "own"


def test_uvicorn_access_arguments_become_fields() -> None:
    line = _foreign("uvicorn.access", '%s - "%s %s HTTP/%s" %d',
                    ("127.0.0.1:5000", "GET", "/v1/tasks/x/events?api_key=s3cret", "1.1", 200))
    fields = access_fields(None, "info", line)
    assert (fields["event"], fields["method"], fields["status"], fields["client"]) == (
        "http.access", "GET", 200, "127.0.0.1:5000")
    assert fields["path"] == "/v1/tasks/x/events?api_key=***"


def test_private_fields_are_dropped_above_debug_only() -> None:
    assert drop_private(None, "info", {"event": "x", "prompt": "p", "metadata": {}, "level": "info"}) == {
        "event": "x", "level": "info"}
    assert "prompt" in drop_private(None, "debug", {"event": "x", "prompt": "p", "level": "debug"})
    assert redact("a?api_key=k&b=1") == "a?api_key=***&b=1"
