"""The terminal view of a task: the thinking (dimmed, under "Thinking"), then the answer, then the bill.

A `stream.gap` (events lost on their way: Redis lost them) is said where it happens, and the whole text is
printed again from the terminal event, which always carries it. A retry voids the text of the failed
attempt (README): the renderer says so and starts the
Thinking/Answer sections afresh for the new attempt; so does a manual retry's new run (a task.queued
with run > 0), whose viewers replay the earlier runs first. The same happens when a task is redelivered
after its worker was lost (a task.started for a later attempt, with no task.retrying before it).

Piped to a file, rich prints plain text with no control codes; text that comes from the task (the
model's output, error messages, image references) is stripped of control characters either way, so
a task cannot move the cursor or recolour the viewer's terminal.
"""

from __future__ import annotations

import datetime as dt
import json
import posixpath
import re
from collections.abc import Iterable
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from contracts import events as ev

# C0 controls except tab and newline, DEL, and C1 controls (CSI and friends) but NEL (U+0085, a line break).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x84\x86-\x9f]")


def clean(value: Any) -> str:
    """str(value) without terminal control characters (ESC sequences cannot start)."""
    return _CONTROL.sub("", str(value))


class EventRenderer:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self._section: str | None = None
        self._attempt = 0  # the attempt whose text is on screen
        self._shown_text = False  # some thinking/answer text of that attempt was printed
        self._retried = False
        self._gap = False  # a stream.gap: the text on screen has a hole; the terminal event's is whole

    def render_all(self, events: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
        """Render every event (a subscription ends after the latest run's terminal one); returns that
        terminal event (None if the stream ended without one)."""
        terminal = None
        for event in events:
            self.render(event)
            terminal = _latest_terminal(terminal, event)
        return terminal

    def render(self, event: dict[str, Any]) -> None:
        handler = getattr(self, "_on_" + event["type"].replace(".", "_"), None)
        if handler:
            handler(event)

    # -- sections ------------------------------------------------------------------------------
    def _heading(self, section: str, title: str, style: str) -> None:
        if self._section == section:
            return
        if self._section is not None:
            self.console.print()
        self.console.print()
        if self._retried:
            title = f"{title} (attempt {self._attempt})"
        self.console.rule(title, style=style, align="left")
        self._section = section

    def _end_section(self) -> None:
        if self._section is not None:
            self.console.print()
            self._section = None

    def _void_partial_text(self, new_attempt: int, why: str, *, always: bool = False) -> None:
        """The text on screen belongs to a failed attempt: say so and start afresh."""
        self._end_section()
        if self._shown_text:
            why += f"; the text above is void (partial output of attempt {self._attempt})"
        if self._shown_text or always:
            self.console.print(Text(why, style="yellow"))
        self._attempt = new_attempt
        self._shown_text = False
        self._retried = True

    def _text(self, event: dict[str, Any]) -> str:
        attempt = int(event.get("attempt") or 0)
        if attempt > self._attempt and self._shown_text:  # a retry we did not see announced
            self._void_partial_text(attempt, f"attempt {attempt} started over")
        self._attempt = max(self._attempt, attempt)
        self._shown_text = True
        return clean(event.get("text", ""))

    # -- events --------------------------------------------------------------------------------
    def _on_task_queued(self, event: dict[str, Any]) -> None:
        run = int(event.get("run") or 0)
        if run > 0:  # a manual retry: the earlier run's text is void, like a failed attempt's
            self._void_partial_text(int(event.get("attempt") or 0), f"retried as run {run}", always=True)
        line = Text("queued ", style="dim")
        line.append(f"{clean(event['task_id'])}  model={clean(event.get('model'))}  "
                    f"images={clean(event.get('image_count'))}", style="")
        self.console.print(line)

    def _on_task_started(self, event: dict[str, Any]) -> None:
        attempt = int(event.get("attempt") or 0)
        if attempt > self._attempt and self._shown_text:
            self._void_partial_text(attempt, f"the worker running attempt {self._attempt} was lost")
        self._attempt = max(self._attempt, attempt)
        line = Text("started ", style="dim")
        line.append(f"on {clean(event.get('worker'))} (attempt {attempt})", style="")
        self.console.print(line)

    def _on_images_ready(self, event: dict[str, Any]) -> None:
        print_images(self.console, event.get("images") or [])
        line = Text("image tokens: ", style="dim")
        line.append(clean(event.get("image_tokens")), style="")
        self.console.print(line)

    def _on_reasoning_delta(self, event: dict[str, Any]) -> None:
        text = self._text(event)
        self._heading("reasoning", "Thinking", "dim")
        self.console.print(text, end="", style="dim", markup=False)

    def _on_answer_delta(self, event: dict[str, Any]) -> None:
        text = self._text(event)
        self._heading("answer", "Answer", "bold green")
        self.console.print(text, end="", markup=False)

    def _on_task_retrying(self, event: dict[str, Any]) -> None:
        error = event.get("error") or {}
        failed = self._attempt or int(event["attempt"]) - 1
        self._void_partial_text(int(event["attempt"]), f"attempt {failed} failed", always=True)
        self.console.print(Text(f"{clean(error.get('code'))}: {clean(error.get('message'))}; retrying as "
                                f"attempt {event['attempt']} in {clean(event.get('delay_s'))} s", style="yellow"))

    def _on_task_waiting(self, event: dict[str, Any]) -> None:
        reason = str(event.get("reason") or "flow control").replace("_", " ")
        self.console.print(Text(f"waiting: {clean(reason)} (about {clean(event.get('wait_s'))} s)", style="yellow"))

    def _on_stream_gap(self, event: dict[str, Any]) -> None:
        self._end_section()
        self._gap = True
        self.console.print(Text(f"events {clean(event.get('from_seq'))}-{clean(event.get('to_seq'))} were lost "
                                "on their way (Redis lost them); the text above has a hole: the whole text "
                                "follows when the task ends", style="yellow"))

    def _on_task_completed(self, event: dict[str, Any]) -> None:
        self._end_section()
        if self._gap:  # the deltas had a hole: the terminal event carries the whole text
            self.console.print(Text("the whole text, from the task's result:", style="yellow"))
            self._heading("reasoning", "Thinking (whole)", "dim")
            self.console.print(clean(event.get("reasoning", "")), end="", style="dim", markup=False)
            self._heading("answer", "Answer (whole)", "bold green")
            self.console.print(clean(event.get("answer", "")), end="", markup=False)
            self._end_section()
            self._gap = False
        self.console.print()
        print_usage(self.console, event.get("usage"), event.get("cost"), event.get("timings"))

    def _on_task_failed(self, event: dict[str, Any]) -> None:
        self._end_section()
        error = event.get("error") or {}
        line = Text("failed ", style="bold red")
        line.append(f"{clean(error.get('code'))}: {clean(error.get('message'))}", style="")
        self.console.print(line)

    def _on_task_cancelled(self, _event: dict[str, Any]) -> None:
        self._end_section()
        self.console.print(Text("cancelled", style="yellow"))


def print_images(console: Console, images: list[dict[str, Any]]) -> None:
    """One row per image: its reference (whole, or the tail that fits the terminal, from a "/" on, so the
    file name is whole), sizes, bytes, tokens."""
    rows = [[clean(image["format"]), f"{image['width']}x{image['height']}",
             f"{image['sent_width']}x{image['sent_height']}", f"{image['bytes']:,}", str(image["tokens"])]
            for image in images]
    headers = ["format", "size", "sent as", "bytes", "tokens"]
    others = sum(max(len(cell) for cell in column) + 2 for column in zip(headers, *rows, strict=False))
    limit = max(_REF_MIN, min(_REF_MAX, console.width - others - 1))
    table = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
    table.add_column("image", overflow="fold")  # folded, never cut: a name longer than the space stays whole
    for column in headers:
        table.add_column(column, justify="right" if column in {"bytes", "tokens"} else "left", no_wrap=True)
    for image, row in zip(images, rows, strict=True):
        ref = short_ref(clean(image["ref"]), limit)
        table.add_row(Text(f"(turn {clean(image.get('turn'))}) {ref}" if image.get("history") else ref), *row)
    console.print(table)


def print_json_events(events: Iterable[dict[str, Any]], out: TextIO) -> dict[str, Any] | None:
    terminal = None
    for event in events:
        out.write(json.dumps(event, ensure_ascii=False) + "\n")
        out.flush()
        terminal = _latest_terminal(terminal, event)
    return terminal


def _latest_terminal(terminal: dict[str, Any] | None, event: dict[str, Any]) -> dict[str, Any] | None:
    """The terminal event of the latest run so far (a later run's task.queued voids the earlier one)."""
    if ev.is_terminal(event):
        return event
    return None if event["type"] == ev.QUEUED else terminal


_REF_MIN, _REF_MAX = 24, 48


def short_ref(ref: str, limit: int = _REF_MAX) -> str:
    """The reference whole, or its tail from a "/" on: the file name is never cut."""
    if len(ref) <= limit:
        return ref
    name = posixpath.basename(ref.rstrip("/")) or ref
    tail = ref[-(limit - 1):]
    cut = tail.find("/")
    while 0 <= cut < len(tail) - 1 and tail[cut + 1] == "/":  # "file:///a" cut at "///" keeps one "/"
        cut += 1
    if len(name) + 2 > limit or cut < 0:
        return "…/" + name
    return "…" + tail[cut:]


# -- usage, cost and timings, as the viewer and `qvq result` show them --------------------------
_MONEY_STEP = Decimal("0.000001")  # prices are per 1,000 tokens with 3 decimals: 6 places are exact
TIMINGS = {"queue_s": "queued", "first_reasoning_s": "first thinking", "first_answer_s": "first answer",
           "total_s": "total"}


def money(value: Any, currency: Any = "CNY") -> str:
    """0.01004 CNY, never 8e-05: a decimal, rounded to a millionth, without trailing zeros."""
    if value is None:
        return f"? {clean(currency)}".strip()
    try:
        amount = Decimal(str(value)).quantize(_MONEY_STEP, rounding=ROUND_HALF_UP)
    except (InvalidOperation, ValueError):
        return f"{clean(value)} {clean(currency)}".strip()
    text = format(amount.normalize(), "f")
    return f"{'0' if text in {'-0', ''} else text} {clean(currency)}".strip()


def duration(seconds: Any) -> str:
    try:
        value = float(seconds)
    except (TypeError, ValueError):
        return clean(seconds)
    if value < 10:
        return f"{value:.2f} s"
    if value < 60:
        return f"{value:.1f} s"
    minutes, rest = divmod(round(value), 60)
    return f"{minutes} min {rest} s"


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else clean("?" if value is None else value)


def usage_lines(usage: dict[str, Any] | None, cost: dict[str, Any] | None,
                timings: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(label, value) pairs: tokens, cost and timings in words a reader takes in at a glance."""
    usage, cost, timings = usage or {}, cost or {}, timings or {}
    lines: list[tuple[str, str]] = []
    if usage:
        images = (usage.get("prompt_tokens_details") or {}).get("image_tokens")
        prompt = _count(usage.get("prompt_tokens")) + (f" (images {_count(images)})" if images is not None else "")
        lines += [("prompt tokens", prompt), ("completion tokens", _count(usage.get("completion_tokens"))),
                  ("total tokens", _count(usage.get("total_tokens")))]
    if cost:
        currency = cost.get("currency") or "CNY"
        lines.append(("cost", f"{money(cost.get('total'), currency)} (input {money(cost.get('input'), '')} + "
                              f"output {money(cost.get('output'), '')})"))
    shown = [f"{TIMINGS.get(key, clean(key))} {duration(value)}" for key, value in timings.items()
             if value is not None]
    if shown:
        lines.append(("timings", ", ".join(shown)))
    return lines


def print_usage(console: Console, usage: dict[str, Any] | None, cost: dict[str, Any] | None,
                timings: dict[str, Any] | None) -> None:
    lines = usage_lines(usage, cost, timings)
    if not lines:
        return
    console.rule("Usage", style="cyan", align="left")
    width = max(len(label) for label, _ in lines)
    for label, value in lines:
        line = Text(f"{label:<{width}}  ", style="dim")
        line.append(value)
        console.print(line)


# -- a task's record, as `qvq result` shows it ---------------------------------------------------------
def print_record(console: Console, record: Any) -> None:
    """The question, the images, the thinking and the answer (or the error), usage, cost and timings."""
    head = Text(clean(record.id), style="bold")
    head.append(f"  {record.status}", style="green" if record.status == "completed" else "yellow")
    head.append(f"  model {clean(record.model)}  attempts {record.attempts}"
                + (f"  tenant {clean(record.tenant)}" if record.tenant else "")
                + (f"  conversation {clean(record.conversation_id)}" if record.conversation_id else ""))
    console.print(head)
    times = [f"{label} {moment.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S} UTC" for label, moment in
             (("created", record.created_at), ("started", record.started_at), ("finished", record.finished_at))
             if moment]
    console.print(Text("  ".join(times), style="dim"))
    question = (record.request or {}).get("prompt")
    if question:
        console.rule("Question", style="dim", align="left")
        console.print(Text(clean(question)))
    if record.images:
        console.print()
        print_images(console, record.images)
    for title, text, style in (("Thinking", record.reasoning, "dim"), ("Answer", record.answer, "")):
        if text:
            console.print()
            console.rule(title, style=style or "bold green", align="left")
            console.print(Text(clean(text), style=style))
    if record.error_code:
        line = Text(f"\n{clean(record.error_code)}", style="bold red")
        line.append(f": {clean(record.error_message)}", style="")
        console.print(line)
    console.print()
    print_usage(console, record.usage, record.cost, record.timings)
