"""Delta coalescing: text is flushed as one event after `max_delay_s` since the first unflushed
character or once `max_chars` are buffered, and always before any other event.

Every method runs on the worker's event loop (worker/loop.py), so nothing here takes a lock. A buffer
that is due when the next piece of text arrives is flushed then; the deadline of a quiet buffer is kept
by one timer per loop for all coalescers (`DueTimer`), on a TICK_S grid: each wake-up of a loop costs
tens of µs of CPU, so hundreds of streams due within the same few ms share one wake-up instead of one
timer each (bench/RESULTS.md).

Nothing may follow a run's terminal event: the pipeline `close()`s the coalescer before it publishes
one. Close flushes what is buffered, cancels the timer, then refuses further text.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
import weakref
from collections.abc import Callable

Emit = Callable[[str, str], None]  # (event type, text); called on the loop, must not block
TICK_S = 0.005  # quiet buffers are flushed on this grid: at most this much after their deadline


class DeltaCoalescer:
    def __init__(self, emit: Emit, *, max_delay_s: float, max_chars: int) -> None:
        self._emit = emit
        self._max_delay_s = max_delay_s
        self._max_chars = max_chars
        self._kind: str | None = None
        self._parts: list[str] = []
        self._size = 0
        self._since = 0.0
        self._scheduled = False
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
        now = time.monotonic()
        if not self._parts:
            self._since = now
            self._kind = kind
            if self._max_delay_s > 0 and not self._scheduled:
                self._scheduled = True
                due_timer().schedule(now + self._max_delay_s, self)
        self._parts.append(text)
        self._size += len(text)
        if self._size >= self._max_chars or now - self._since >= self._max_delay_s:
            self.flush()

    def flush(self) -> None:
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

    def discard(self) -> None:
        """Drop buffered text (its attempt failed)."""
        self._parts, self._size, self._kind = [], 0, None

    def flush_if_due(self, now: float) -> float | None:
        """The timer's call: flush when due; the next deadline to keep, or None."""
        self._scheduled = False
        if self._closed or not self._parts:
            return None
        deadline = self._since + self._max_delay_s
        if deadline > now:
            self._scheduled = True
            return deadline
        self.flush()
        return None


class DueTimer:
    """One loop timer for the deadlines of every coalescer on the loop, rounded up to the TICK_S grid."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, DeltaCoalescer]] = []
        self._order = itertools.count()
        self._armed_at: float | None = None
        self._handle: asyncio.TimerHandle | None = None

    def schedule(self, deadline: float, coalescer: DeltaCoalescer) -> None:
        heapq.heappush(self._heap, (deadline, next(self._order), coalescer))
        self._arm(deadline)

    def _arm(self, deadline: float) -> None:
        at = math.ceil(deadline / TICK_S) * TICK_S
        if self._armed_at is not None and self._armed_at <= at:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = at
        self._handle = self._loop.call_at(self._loop.time() + max(0.0, at - time.monotonic()), self._fire)

    def _fire(self) -> None:
        self._armed_at = self._handle = None
        now = time.monotonic()
        later: list[tuple[float, DeltaCoalescer]] = []
        while self._heap and self._heap[0][0] <= now + TICK_S / 2:
            _, _, coalescer = heapq.heappop(self._heap)
            try:
                again = coalescer.flush_if_due(now)
            except Exception:  # one stream's failed emit must not stop the others' flushes
                again = None
            if again is not None:
                later.append((again, coalescer))
        for deadline, coalescer in later:
            heapq.heappush(self._heap, (deadline, next(self._order), coalescer))
        if self._heap:
            self._arm(self._heap[0][0])


_timers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, DueTimer] = weakref.WeakKeyDictionary()


def due_timer() -> DueTimer:
    """The running loop's timer of coalescer deadlines."""
    loop = asyncio.get_running_loop()
    timer = _timers.get(loop)
    if timer is None:
        timer = _timers[loop] = DueTimer(loop)
    return timer
