"""The terminal view: a retry voids the failed attempt's text and starts fresh sections; text from the
task cannot inject control codes; `qvq follow` piped to a file is plain text."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import redis
from rich.console import Console

from contracts import events as ev
from contracts.bus import EventBus
from contracts.job import parse_job
from contracts.store import Store
from producer.cli.render import EventRenderer, clean, duration, money, short_ref, usage_lines
from producer.cli.waiting import WaitingView, events_with_waiting

REPO = Path(__file__).resolve().parents[2]


def _event(type_: str, attempt: int, **fields: Any) -> dict[str, Any]:
    return {"task_id": "t1", "seq": 0, "type": type_, "ts": 0.0, "attempt": attempt, **fields}


RETRIED_RUN = [
    _event(ev.QUEUED, 0, model="qvq-max", image_count=1),
    _event(ev.STARTED, 1, worker="w1"),
    _event(ev.REASONING_DELTA, 1, text="FIRST-THOUGHT "),
    _event(ev.ANSWER_DELTA, 1, text="FIRST-PARTIAL"),
    _event(ev.RETRYING, 2, error={"code": "model.stream_broken", "message": "the stream was cut"}, delay_s=0.1),
    _event(ev.REASONING_DELTA, 2, text="SECOND-THOUGHT"),
    _event(ev.ANSWER_DELTA, 2, text="SECOND-ANSWER"),
    _event(ev.COMPLETED, 2, reasoning="SECOND-THOUGHT", answer="SECOND-ANSWER",
           usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
           cost={"input": 0.1, "output": 0.2, "total": 0.3, "currency": "CNY"}, timings={"total_s": 1.5}),
]


def render(events: list[dict[str, Any]], **console_options: Any) -> str:
    out = io.StringIO()
    console = Console(file=out, width=100, highlight=False, soft_wrap=True, **console_options)
    terminal = EventRenderer(console).render_all(events)
    assert terminal is not None and ev.is_terminal(terminal)
    return out.getvalue()


def test_a_retry_voids_the_partial_text_and_starts_fresh_sections() -> None:
    text = render(RETRIED_RUN)
    void = text.index("attempt 1 failed; the text above is void")
    assert text.index("FIRST-PARTIAL") < void
    assert "model.stream_broken: the stream was cut; retrying as attempt 2 in 0.1 s" in text
    fresh_thinking = text.index("Thinking (attempt 2)")
    fresh_answer = text.index("Answer (attempt 2)")
    assert void < fresh_thinking < text.index("SECOND-THOUGHT") < fresh_answer < text.index("SECOND-ANSWER")
    assert text.count("FIRST-PARTIAL") == 1 and "0.3 CNY (input 0.1 + output 0.2)" in text


def test_a_redelivery_after_a_lost_worker_also_voids_the_text() -> None:
    events = [
        _event(ev.STARTED, 1, worker="w1"),
        _event(ev.ANSWER_DELTA, 1, text="LOST-WORK"),
        _event(ev.STARTED, 2, worker="w2"),
        _event(ev.ANSWER_DELTA, 2, text="REDONE"),
        _event(ev.CANCELLED, 2),
    ]
    text = render(events)
    assert text.index("LOST-WORK") < text.index("worker running attempt 1 was lost; the text above is void")
    assert text.index("Answer (attempt 2)") < text.index("REDONE")


def test_a_retry_before_any_text_just_says_so() -> None:
    events = [_event(ev.STARTED, 1, worker="w1"),
              _event(ev.RETRYING, 2, error={"code": "model.rate_limited", "message": "429"}, delay_s=1),
              _event(ev.ANSWER_DELTA, 2, text="OK"),
              _event(ev.FAILED, 2, error={"code": "internal", "message": "boom", "retryable": False})]
    text = render(events)
    assert "attempt 1 failed\n" in text and "void" not in text
    assert "failed internal: boom" in text


def test_task_text_cannot_inject_control_codes_even_on_a_terminal() -> None:
    hostile = "\x1b[2J\x1b]0;pwned\x07clear\x9b31m\rme\x08"
    events = [_event(ev.ANSWER_DELTA, 1, text=hostile),
              _event(ev.FAILED, 1, error={"code": "internal", "message": "\x1b[31mred", "retryable": False})]
    text = render(events, force_terminal=True, color_system="truecolor")
    assert "\x1b[2J" not in text and "\x1b]0;" not in text and "\x07" not in text and "\x9b" not in text
    assert "\r" not in text and "\x08" not in text and "\x1b[31mred" not in text
    assert "clear" in text and "[2J" in text  # printable remains are shown, harmlessly
    assert clean("a\tb\nc\x1bd\x7f") == "a\tb\ncd"


def test_qvq_follow_piped_to_a_file_has_no_control_codes(
        redis_url: str, redis_client: redis.Redis, sqlite_url: str, tmp_path: Path) -> None:
    store = Store.from_url(sqlite_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "What is it?"})
    store.create_task(job)
    store.dispose()
    bus = EventBus(redis_client)
    for event in RETRIED_RUN:
        fields = {k: v for k, v in event.items() if k not in {"task_id", "seq", "type", "ts", "attempt"}}
        bus.publish(job.task_id, event["type"], event["attempt"], **fields)

    env = {k: v for k, v in os.environ.items() if k not in {"FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"}}
    env.update(REDIS_URL=redis_url, DATABASE_URL=sqlite_url, TERM="xterm-256color", COLUMNS="100",
               PYTHONPATH=str(REPO))
    out_path = tmp_path / "follow.txt"
    with out_path.open("wb") as out:
        done = subprocess.run([sys.executable, "-m", "producer.cli", "follow", job.task_id], stdout=out,
                              stderr=subprocess.PIPE, env=env, cwd=REPO, timeout=30)
    assert done.returncode == 0, done.stderr.decode()
    text = out_path.read_text()
    assert "\x1b" not in text
    assert "FIRST-PARTIAL" in text and "the text above is void" in text and "SECOND-ANSWER" in text
    assert text.index("Answer (attempt 2)") < text.index("SECOND-ANSWER")


def test_money_is_a_plain_decimal_with_its_currency() -> None:
    assert money(8e-05) == "0.00008 CNY"
    assert money(0.010040000000000001) == "0.01004 CNY"  # float noise rounded to the millionth
    assert money(12) == "12 CNY" and money(0.0) == "0 CNY" and money("0.0020", "USD") == "0.002 USD"
    assert money(None) == "? CNY" and money(0.5, "") == "0.5"


def test_the_bill_reads_as_words_and_decimals() -> None:
    lines = dict(usage_lines({"prompt_tokens": 1544, "completion_tokens": 590, "total_tokens": 2134,
                              "prompt_tokens_details": {"image_tokens": 1520}},
                             {"input": 0.012352, "output": 0.01888, "total": 0.031232, "currency": "CNY"},
                             {"queue_s": 0.0123, "first_reasoning_s": 1.5, "first_answer_s": None, "total_s": 75.2}))
    assert lines["prompt tokens"] == "1,544 (images 1,520)" and lines["total tokens"] == "2,134"
    assert lines["cost"] == "0.031232 CNY (input 0.012352 + output 0.01888)"
    assert lines["timings"] == "queued 0.01 s, first thinking 1.50 s, total 1 min 15 s"
    assert duration(12.34) == "12.3 s"


def test_a_long_image_reference_keeps_its_file_name() -> None:
    ref = "/home/someone/projects/receipts/2025/march/scans/high-resolution/receipt-0042.png"
    short = short_ref(ref)
    assert short.endswith("/receipt-0042.png") and short.startswith("…/") and len(short) <= 48
    assert short_ref("s3://b/k.png") == "s3://b/k.png"
    named = "s3://bucket/" + "x" * 70 + ".png"
    assert short_ref(named) == "…/" + "x" * 70 + ".png"  # a name longer than the limit is kept whole


def test_the_image_table_never_cuts_the_file_name_on_a_narrow_terminal() -> None:
    ref = "file:///home/someone/projects/receipts/2025/march/receipt-with-a-long-name-0042.png"
    image = {"ref": ref, "format": "PNG", "width": 640, "height": 420, "sent_width": 640, "sent_height": 420,
             "bytes": 8609, "tokens": 347}
    out = io.StringIO()
    console = Console(file=out, width=60, highlight=False, soft_wrap=True)
    EventRenderer(console).render(_event(ev.IMAGES_READY, 1, images=[image], image_tokens=347))
    rows = out.getvalue().splitlines()[1:-1]  # between the header and the "image tokens" line
    first_column = "".join(row.split()[0] for row in rows)  # the column folds a long reference over lines
    assert first_column.startswith("…/") and first_column.endswith("/receipt-with-a-long-name-0042.png")
    assert first_column[1:] in ref


def test_the_image_table_fits_the_reference_to_an_80_column_terminal_without_folding() -> None:
    ref = "file:///tmp/newuser/producer/samples/triangle.png"  # 49 characters, cut inside "///"
    image = {"ref": ref, "format": "PNG", "width": 640, "height": 420, "sent_width": 640, "sent_height": 420,
             "bytes": 8609, "tokens": 347}
    out = io.StringIO()
    EventRenderer(Console(file=out, width=80, highlight=False)).render(
        _event(ev.IMAGES_READY, 1, images=[image], image_tokens=347))
    rows = out.getvalue().splitlines()
    assert len(rows) == 3, rows  # header, one row, the image tokens line
    shown = rows[1].split()[0]
    assert shown.startswith("…/") and "//" not in shown and shown.endswith("/samples/triangle.png"), shown


def test_a_stream_gap_is_said_and_the_whole_text_is_printed_from_the_terminal_event() -> None:
    out = io.StringIO()
    EventRenderer(Console(file=out, width=100, force_terminal=False)).render_all([
        _event(ev.STARTED, 1, worker="w1"),
        _event(ev.REASONING_DELTA, 1, text="The triangle "),
        {"task_id": "t1", "seq": 9, "type": ev.STREAM_GAP, "ts": 0.0, "from_seq": 4, "to_seq": 9},
        _event(ev.ANSWER_DELTA, 1, text="cm."),
        _event(ev.COMPLETED, 1, reasoning="The triangle has sides 3, 4 and 5.", answer="Six square cm.",
               usage={"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
               cost={"input": 0.1, "output": 0.2, "total": 0.3, "currency": "CNY"}, timings={"total_s": 1.5}),
    ])
    text = out.getvalue()
    assert "events 4-9 were lost" in text and "the whole text, from the task's result" in text
    assert "The triangle has sides 3, 4 and 5." in text and "Six square cm." in text
    assert text.index("events 4-9") < text.index("Six square cm.")


def test_a_viewer_whose_task_left_the_queue_follows_it_to_the_end_without_an_idle_limit() -> None:
    """While queued, the viewer follows with an idle limit (to say what the task waits for). When that
    limit passes and the task is no longer queued (it ran and ended while Redis was away), it follows
    on without the limit, so the row can end it; it never loops on the idle limit."""
    calls: list[Any] = []

    class Tasks:
        def events(self, task_id: str, from_seq: int = 0, idle_timeout: float | None = None) -> Any:
            calls.append(idle_timeout)
            if idle_timeout is not None:
                raise TimeoutError("no event")
            return iter([_event(ev.COMPLETED, 1, reasoning="r", answer="a", from_row=True)])

        def get(self, task_id: str) -> Any:
            return SimpleNamespace(status="completed")

        def queue_state(self) -> None:
            raise AssertionError("a task that is not queued has no queue to show")

    events = list(events_with_waiting(Tasks(), "t1", 0, WaitingView(Console(file=io.StringIO()))))  # type: ignore[arg-type]
    assert [e["type"] for e in events] == [ev.COMPLETED] and calls == [1.5, None]
