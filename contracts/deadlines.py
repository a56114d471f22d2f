"""Total deadlines for downloads: one watchdog thread for the whole process.

A read timeout bounds each read, not a download: a server that drips one byte per read timeout keeps a
fetch open for ever. A `Deadline` holds the socket of one request; when it passes, the socket is shut
down from the watchdog thread, which wakes the read blocked in it. Used by the https fetcher (httpcore's
trace hook gives the socket), the object stores (urllib3's connection gives it) and a batch's header reads
(contracts/object_store.py).
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import socket
import threading
import time
from typing import Any

DOWNLOAD_TIME_FACTOR = 3  # one download may take at most this many fetch timeouts in all


class Deadline:
    """One request's total deadline: when it passes, the request's socket is shut down."""

    def __init__(self, at: float) -> None:
        self.at = at
        self.fired = False
        self.cancelled = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()

    def trace(self, name: str, info: dict[str, Any]) -> None:
        """httpcore's trace hook: note the socket of the connection the request made."""
        if name == "connection.connect_tcp.complete" and info.get("return_value") is not None:
            self.attach(info["return_value"].get_extra_info("socket"))

    def attach(self, sock: socket.socket | None) -> None:
        """The socket to shut down when the deadline passes (at once, when it passed already)."""
        with self._lock:
            self._socket = sock
            fired = self.fired
        if fired:
            self.fire()

    def fire(self) -> None:
        with self._lock:
            if self.cancelled:
                return
            self.fired = True
            sock = self._socket
        if sock is not None:
            with contextlib.suppress(OSError):  # already closed
                sock.shutdown(socket.SHUT_RDWR)  # wakes a read blocked in it (close() would not)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True


class Deadlines:
    """One daemon thread for every fetch deadline of the process (a heap; it sleeps until the next)."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Deadline]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def start(self, seconds: float) -> Deadline:
        deadline = Deadline(time.monotonic() + seconds)
        with self._cond:
            heapq.heappush(self._heap, (deadline.at, next(self._order), deadline))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="qvq-fetch-deadlines", daemon=True)
                self._thread.start()
            self._cond.notify()
        return deadline

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._heap:
                    self._cond.wait()
                at, _, deadline = self._heap[0]
                if at > time.monotonic():
                    self._cond.wait(at - time.monotonic())
                    continue
                heapq.heappop(self._heap)
            if not deadline.cancelled:
                deadline.fire()


DEADLINES = Deadlines()
