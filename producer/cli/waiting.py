"""While a task sits queued, its viewer says what it waits for (the client's queue_state: the messages
ahead of it and the workers consuming its queue); a spinner on a terminal, plain lines when piped."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.console import Console
from rich.status import Status

from contracts import events as ev
from producer.protocol import QueueView, TaskClient

IDLE_S = 1.5  # without an event for this long, a queued task's viewer says what it waits for


class WaitingView:
    """Says what a queued task waits for: a spinner on a terminal; when piped, a plain line each time
    the state changes (no control codes, nothing repeated)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._status: Status | None = None
        self._last: str | None = None

    def show(self, state: QueueView) -> None:
        line = state.describe()
        if not self.console.is_terminal:
            if line != self._last:
                self.console.print(line, markup=False, highlight=False)
        elif self._status is None:
            self._status = self.console.status(line)
            self._status.start()
        else:
            self._status.update(line)
        self._last = line

    def stop(self) -> None:
        status, self._status = self._status, None
        if status is not None:
            status.stop()


def events_with_waiting(client: TaskClient, task_id: str, from_seq: int, view: WaitingView,
                        idle_s: float = IDLE_S) -> Iterator[dict[str, Any]]:
    """The task's events; while it sits queued with nothing happening for idle_s, the view says what
    it waits for (when the client can tell). The events missed while probing are replayed from the
    task's log, none lost."""
    last_seq, queued = from_seq, True
    try:
        while True:
            try:
                for event in client.events(task_id, from_seq=last_seq, idle_timeout=idle_s if queued else None):
                    view.stop()
                    last_seq, queued = event["seq"], event["type"] == ev.QUEUED
                    yield event
                return
            except TimeoutError:
                if not queued or client.get(task_id).status != "queued":
                    queued = False  # it left the queue (maybe ended while Redis was away): follow to its end
                    continue
                state = client.queue_state()
                if state is None:  # the client cannot look at the queue: just keep following
                    queued = False
                else:
                    view.show(state)
    finally:
        view.stop()
