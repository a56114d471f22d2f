"""Delta coalescing: text is flushed as one event after `max_delay_s` since the first unflushed
character or once `max_chars` are buffered, and always before any other event.

Every method runs on the worker's event loop (worker/loop.py), so nothing here takes a lock: the
deadline of a quiet buffer is a loop timer (`call_later`), not a flusher thread.

Nothing may follow a run's terminal event: the pipeline `close()`s the coalescer before it publishes
one. Close flushes what is buffered, cancels the timer, then refuses further text.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

Emit = Callable[[str, str], None]  # (event type, text); called on the loop, must not block


class DeltaCoalescer:
    def __init__(self, emit: Emit, *, max_delay_s: float, max_chars: int) -> None:
        self._emit = emit
        self._max_delay_s = max_delay_s
        self._max_chars = max_chars
        self._kind: str | None = None
        self._parts: list[str] = []
        self._size = 0
        self._since = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False
        self.flushes = 0
        self.refused = 0  # pieces of text added after close (dropped)

    def add(self, kind: str, text: str) -> None:
        if not text:
            return
        if self._closed:
            self.refused += 1
            return
        if self._kind is not None and kind != self._kind:
            self.flush()
        if not self._parts:
            self._since = time.monotonic()
            self._kind = kind
            if self._max_delay_s > 0:
                self._timer = asyncio.get_running_loop().call_later(self._max_delay_s, self._due)
        self._parts.append(text)
        self._size += len(text)
        if self._size >= self._max_chars or self._max_delay_s <= 0:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._parts:
            return
        text, kind = "".join(self._parts), self._kind
        self._parts, self._size, self._kind = [], 0, None
        assert kind is not None
        self._emit(kind, text)
        self.flushes += 1

    def close(self) -> None:
        """Flush, then refuse any further text."""
        try:
            self.flush()
        finally:
            self._closed = True
            self.discard()

    @property
    def closed(self) -> bool:
        return self._closed

    def discard(self) -> None:
        """Drop buffered text (its attempt failed)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._parts, self._size, self._kind = [], 0, None

    def _due(self) -> None:
        self._timer = None
        if not self._closed:
            self.flush()
