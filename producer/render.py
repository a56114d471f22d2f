"""The terminal view of a task: the thinking (dimmed, under "Thinking"), then the answer, then the bill.

A retry voids the text of the failed attempt (design.md): the renderer says so and starts the
Thinking/Answer sections afresh for the new attempt; so does a manual retry's new run (a task.queued
with run > 0), whose viewers replay the earlier runs first. The same happens when a task is redelivered
after its worker was lost (a task.started for a later attempt, with no task.retrying before it).

Piped to a file, rich prints plain text with no control codes; text that comes from the task (the
model's output, error messages, image references) is stripped of control characters either way, so
a task cannot move the cursor or recolour the viewer's terminal.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table
from rich.text import Text

from contracts import events as ev

# C0 controls except tab and newline, DEL, and C1 controls (CSI and friends).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


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
        table = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
        for column in ("image", "format", "size", "sent as", "bytes", "tokens"):
            table.add_column(column, justify="right" if column in {"bytes", "tokens"} else "left")
        for image in event.get("images", []):
            table.add_row(Text(_short(clean(image["ref"]))), clean(image["format"]),
                          f"{image['width']}x{image['height']}", f"{image['sent_width']}x{image['sent_height']}",
                          f"{image['bytes']:,}", str(image["tokens"]))
        self.console.print(table)
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

    def _on_task_completed(self, event: dict[str, Any]) -> None:
        self._end_section()
        usage, cost, timings = event.get("usage") or {}, event.get("cost") or {}, event.get("timings") or {}
        details = usage.get("prompt_tokens_details") or {}
        self.console.print()
        self.console.rule("Usage", style="cyan", align="left")
        self.console.print(Text(
            f"prompt {usage.get('prompt_tokens')} tokens (images {details.get('image_tokens', '?')}), "
            f"completion {usage.get('completion_tokens')}, total {usage.get('total_tokens')}"))
        self.console.print(Text(f"cost {cost.get('total')} {clean(cost.get('currency'))} "
                                f"(input {cost.get('input')} + output {cost.get('output')})"))
        self.console.print(Text("timings " + ", ".join(f"{clean(k)} {v}" for k, v in timings.items()
                                                      if v is not None)))

    def _on_task_failed(self, event: dict[str, Any]) -> None:
        self._end_section()
        error = event.get("error") or {}
        line = Text("failed ", style="bold red")
        line.append(f"{clean(error.get('code'))}: {clean(error.get('message'))}", style="")
        self.console.print(line)

    def _on_task_cancelled(self, _event: dict[str, Any]) -> None:
        self._end_section()
        self.console.print(Text("cancelled", style="yellow"))


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


def _short(ref: str, limit: int = 48) -> str:
    return ref if len(ref) <= limit else "…" + ref[-(limit - 1):]
