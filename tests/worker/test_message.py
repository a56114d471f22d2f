"""The queue message is checked against its task row: only the run the row is at, never another request."""

from __future__ import annotations

from types import SimpleNamespace

from contracts.job import message_for, parse_job
from worker.intake.message import load_record


# -- messages --------------------------------------------------------------------------------------
def test_a_message_is_checked_against_its_task_row() -> None:
    job = parse_job({"images": ["s3://b/k.png"], "prompt": "What is it?", "task_id": "t-1"})
    row = SimpleNamespace(id="t-1", run=1, request=job.to_payload())
    rows = SimpleNamespace(get=lambda task_id: row if task_id == "t-1" else None)
    assert load_record(message_for("t-1", 1), rows) is row  # type: ignore[arg-type]
    assert load_record(job.to_payload(), rows) is row  # type: ignore[arg-type]  # old format, same request
    for refused in (message_for("t-1", 0), message_for("t-2", 1), job.to_payload() | {"prompt": "Other"},
                    {"version": 7, "task_id": "t-1"}, ["t-1"]):
        assert load_record(refused, rows) is None  # type: ignore[arg-type]
    assert load_record(message_for("t-1", 1), rows, delivery_id="t-9") is None  # type: ignore[arg-type]
