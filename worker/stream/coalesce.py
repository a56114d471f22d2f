"""Delta coalescing: text is flushed as one event after `max_delay_s` since the first unflushed
character or once `max_chars` are buffered, and always before any other event.

One background thread per process finds the buffers whose deadline passed while their stream was
quiet, and flushes them (in parallel when several are due at once).

Nothing may follow a run's terminal event: the pipeline `close()`s the coalescer before it publishes
one. Close flushes what is buffered, waits for a background flush in flight (the emit runs under the
coalescer's lock), then refuses further text; its scheduled background flush becomes a no-op.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

Emit = Callable[[str, str], None]  # (event type, text)
FLUSH_THREADS = 32  # publishes of due buffers in flight at once (each waits for its Redis round trip)


class DeltaCoalescer:
    def __init__(self, emit: Emit, *, max_delay_s: float, max_chars: int, flusher: Flusher | None = None) -> None:
        self._emit = emit
        self._max_delay_s = max_delay_s
        self._max_chars = max_chars
        self._flusher = flusher or default_flusher()
        self._lock = threading.Lock()
        self._kind: str | None = None
        self._parts: list[str] = []
        self._size = 0
        self._since = 0.0
        self._closed = False
        self.flushes = 0
        self.refused = 0  # pieces of text added after close (dropped)

    def add(self, kind: str, text: str) -> None:
        if not text:
            return
        with self._lock:
            if self._closed:
                self.refused += 1
                return
            if self._kind is not None and kind != self._kind:
                self._flush_locked()
            if not self._parts:
                self._since = time.monotonic()
                self._kind = kind
                if self._max_delay_s > 0:
                    self._flusher.schedule(self._since + self._max_delay_s, self)
            self._parts.append(text)
            self._size += len(text)
            if self._size >= self._max_chars or time.monotonic() - self._since >= self._max_delay_s:
                self._flush_locked()

    def flush(self) -> None:
        with self._lock:
            self._flush_locked()

    def flush_if_due(self, now: float) -> None:
        with self._lock:
            if not self._closed and self._parts and now - self._since >= self._max_delay_s:
                self._flush_locked()

    def close(self) -> None:
        """Flush, then refuse any further text; returns once no flush of this coalescer is in flight."""
        with self._lock:
            try:
                self._flush_locked()
            finally:
                self._closed = True
                self._parts, self._size, self._kind = [], 0, None

    @property
    def closed(self) -> bool:
        return self._closed

    def discard(self) -> None:
        """Drop buffered text (its attempt failed)."""
        with self._lock:
            self._parts, self._size, self._kind = [], 0, None

    def _flush_locked(self) -> None:
        if not self._parts:
            return
        text, kind = "".join(self._parts), self._kind
        self._parts, self._size, self._kind = [], 0, None
        assert kind is not None
        self._emit(kind, text)
        self.flushes += 1


class Flusher:
    """Wakes at the earliest deadline and flushes the coalescers that are due."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, DeltaCoalescer]] = []
        self._counter = itertools.count()
        self._cond = threading.Condition()
        self._pool: ThreadPoolExecutor | None = None
        self._thread = threading.Thread(target=self._run, name="qvq-delta-flusher", daemon=True)
        self._thread.start()

    def schedule(self, deadline: float, coalescer: DeltaCoalescer) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._counter), coalescer))
            if self._heap[0][2] is coalescer:
                self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                deadline = self._heap[0][0]
                now = time.monotonic()
                if deadline > now:
                    self._cond.wait(deadline - now)
                    continue
                due: dict[DeltaCoalescer, None] = {}
                while self._heap and self._heap[0][0] <= now:
                    coalescer = heapq.heappop(self._heap)[2]
                    if not coalescer.closed:  # a closed one's scheduled flush is cancelled
                        due[coalescer] = None
            self._flush(list(due))

    def _flush(self, due: list[DeltaCoalescer]) -> None:
        """Flush every due coalescer; several at once go out in parallel, so hundreds of quiet streams
        coming due together are not published one round trip after another by this one thread."""
        if len(due) == 1:
            _flush_due(due[0])
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(FLUSH_THREADS, thread_name_prefix="qvq-delta-flush")
        try:
            for _ in self._pool.map(_flush_due, due):
                pass
        except RuntimeError:  # the interpreter is shutting down and takes no new pool work: one by one
            for coalescer in due:
                _flush_due(coalescer)


def _flush_due(coalescer: DeltaCoalescer) -> None:
    with contextlib.suppress(Exception):  # a failed publish must not stop flushing for every other task
        coalescer.flush_if_due(time.monotonic())


_default: Flusher | None = None
_default_lock = threading.Lock()


def default_flusher() -> Flusher:
    global _default
    with _default_lock:
        if _default is None:
            _default = Flusher()
        return _default
