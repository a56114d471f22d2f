"""The terminal view of a task: the thinking (dimmed, under "Thinking"), then the answer, then the bill.

Piped to a file, rich prints plain text with no control codes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any, TextIO

from rich.console import Console
from rich.table import Table

from contracts import events as ev


class EventRenderer:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(highlight=False, soft_wrap=True)
        self._section: str | None = None

    def render_all(self, events: Iterable[dict[str, Any]]) -> dict[str, Any] | None:
        """Render events until the terminal one; returns it (None if the stream ended early)."""
        for event in events:
            self.render(event)
            if ev.is_terminal(event):
                return event
        return None

    def render(self, event: dict[str, Any]) -> None:
        handler = getattr(self, "_on_" + event["type"].replace(".", "_"), None)
        if handler:
            handler(event)

    def _heading(self, section: str, title: str, style: str) -> None:
        if self._section == section:
            return
        if self._section is not None:
            self.console.print()
        self.console.print()
        self.console.rule(title, style=style, align="left")
        self._section = section

    def _end_section(self) -> None:
        if self._section is not None:
            self.console.print()
            self._section = None

    def _on_task_queued(self, event: dict[str, Any]) -> None:
        self.console.print(f"[dim]queued[/] {event['task_id']}  model={event.get('model')}  "
                           f"images={event.get('image_count')}")

    def _on_task_started(self, event: dict[str, Any]) -> None:
        self.console.print(f"[dim]started[/] on {event.get('worker')} (attempt {event['attempt']})")

    def _on_images_ready(self, event: dict[str, Any]) -> None:
        table = Table(title=None, show_edge=False, pad_edge=False, box=None, header_style="bold")
        for column in ("image", "format", "size", "sent as", "bytes", "tokens"):
            table.add_column(column, justify="right" if column in {"bytes", "tokens"} else "left")
        for image in event.get("images", []):
            table.add_row(_short(image["ref"]), image["format"], f"{image['width']}x{image['height']}",
                          f"{image['sent_width']}x{image['sent_height']}", f"{image['bytes']:,}",
                          str(image["tokens"]))
        self.console.print(table)
        self.console.print(f"[dim]image tokens:[/] {event.get('image_tokens')}")

    def _on_reasoning_delta(self, event: dict[str, Any]) -> None:
        self._heading("reasoning", "Thinking", "dim")
        self.console.print(event["text"], end="", style="dim", markup=False)

    def _on_answer_delta(self, event: dict[str, Any]) -> None:
        self._heading("answer", "Answer", "bold green")
        self.console.print(event["text"], end="", markup=False)

    def _on_task_retrying(self, event: dict[str, Any]) -> None:
        self._end_section()
        error = event.get("error", {})
        self.console.print(f"[yellow]attempt failed ({error.get('code')}: {error.get('message')}); "
                           f"the text above is void; retrying as attempt {event['attempt']} "
                           f"in {event.get('delay_s')} s[/]")

    def _on_task_completed(self, event: dict[str, Any]) -> None:
        self._end_section()
        usage, cost, timings = event.get("usage", {}), event.get("cost", {}), event.get("timings", {})
        details = usage.get("prompt_tokens_details") or {}
        self.console.print()
        self.console.rule("Usage", style="cyan", align="left")
        self.console.print(
            f"prompt {usage.get('prompt_tokens')} tokens (images {details.get('image_tokens', '?')}), "
            f"completion {usage.get('completion_tokens')}, total {usage.get('total_tokens')}")
        self.console.print(f"cost {cost.get('total')} {cost.get('currency')} "
                           f"(input {cost.get('input')} + output {cost.get('output')})")
        self.console.print("timings " + ", ".join(f"{k} {v}" for k, v in timings.items() if v is not None))

    def _on_task_failed(self, event: dict[str, Any]) -> None:
        self._end_section()
        error = event.get("error", {})
        self.console.print(f"[bold red]failed[/] {error.get('code')}: {error.get('message')}")

    def _on_task_cancelled(self, _event: dict[str, Any]) -> None:
        self._end_section()
        self.console.print("[yellow]cancelled[/]")


def print_json_events(events: Iterable[dict[str, Any]], out: TextIO) -> dict[str, Any] | None:
    for event in events:
        out.write(json.dumps(event, ensure_ascii=False) + "\n")
        out.flush()
        if ev.is_terminal(event):
            return event
    return None


def _short(ref: str, limit: int = 48) -> str:
    return ref if len(ref) <= limit else "…" + ref[-(limit - 1):]
