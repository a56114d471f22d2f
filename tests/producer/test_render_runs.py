"""The terminal view of a retried task replayed from seq 0: the earlier run's text is void, the
renderer goes on past its terminal event and returns the latest run's."""

from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from contracts import events as ev
from producer.cli.render import EventRenderer, print_json_events


def _event(seq: int, type_: str, attempt: int, **fields: Any) -> dict[str, Any]:
    return {"task_id": "t1", "seq": seq, "type": type_, "ts": 0.0, "attempt": attempt, **fields}


TWO_RUNS = [
    _event(1, ev.QUEUED, 0, model="qvq-max", image_count=1, run=0),
    _event(2, ev.STARTED, 1, worker="w1"),
    _event(3, ev.ANSWER_DELTA, 1, text="FIRST-RUN-TEXT"),
    _event(4, ev.FAILED, 1, error={"code": "model.timeout", "message": "too slow", "retryable": True}),
    _event(5, ev.QUEUED, 1, model="qvq-max", image_count=1, run=1),
    _event(6, ev.STARTED, 2, worker="w1"),
    _event(7, ev.ANSWER_DELTA, 2, text="SECOND-RUN-TEXT"),
    _event(8, ev.COMPLETED, 2, reasoning="", answer="SECOND-RUN-TEXT", usage={}, cost={}, timings={}),
]


def test_a_new_run_voids_the_earlier_runs_text_and_the_latest_terminal_event_is_returned() -> None:
    out = io.StringIO()
    terminal = EventRenderer(Console(file=out, width=100, color_system=None)).render_all(TWO_RUNS)
    text = out.getvalue()
    assert terminal is TWO_RUNS[-1]
    assert text.index("FIRST-RUN-TEXT") < text.index("retried as run 1") < text.index("SECOND-RUN-TEXT")
    assert "the text above is void" in text


def test_json_output_returns_the_latest_runs_terminal_event() -> None:
    assert print_json_events(TWO_RUNS, io.StringIO()) is TWO_RUNS[-1]
    assert print_json_events(TWO_RUNS[:5], io.StringIO()) is None  # the new run has not ended
