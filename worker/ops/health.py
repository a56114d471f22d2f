"""How a worker shows it is alive and consuming: its Prometheus endpoint and a heartbeat file.

- QVQ_METRICS_PORT (default 9808, 0 = off): Prometheus text on every path of that port, served by a
  thread of the worker process (Celery's threads pool: one process serves every stream), but `/livez`:
  the worker's liveness. It answers 503 when the consumer has stopped taking messages while they wait
  (`ConsumerWatch`): a hung consumer is restarted, where a process that merely answers would stay "live".
- QVQ_HEARTBEAT_FILE (default off): touched every HEARTBEAT_INTERVAL_S seconds once the worker consumes
  (after worker_ready), removed at shutdown. A fresh file is the worker's readiness (an exec probe:
  `find FILE -mmin -1`), and serves as liveness where no port may be opened.
Both start at worker_ready and never stop the worker from starting: a port in use is logged.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts.logging import get_logger
from contracts.metrics import WORKER_REGISTRY, serve_registry

log = get_logger(__name__)

HEARTBEAT_INTERVAL_S = 5.0


CONSUMER_STALL_S = 120.0  # no message taken for this long, while some wait and a slot is free: not live


def serve_metrics(port: int, host: str = "0.0.0.0", consumer: ConsumerWatch | None = None) -> Any:
    """Start the worker's metrics endpoint (and /livez); the server, or None when it is off or its port
    is taken."""
    return serve_registry(WORKER_REGISTRY, port, host, checks={"/livez": consumer.problem} if consumer else None)


class ConsumerWatch:
    """Whether this worker still takes messages: `received()` on every message it takes (Celery's
    task_received). `problem()` names what is wrong when none was taken for `stall_s` while messages
    wait in its queues (`waiting`) and it has a free slot (`busy` is False); None otherwise, and when
    the broker cannot be read (a restart would not bring it back)."""

    def __init__(self, waiting: Callable[[], int], busy: Callable[[], bool], stall_s: float = CONSUMER_STALL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._waiting = waiting
        self._busy = busy
        self.stall_s = stall_s
        self._clock = clock
        self._last = clock()

    def received(self) -> None:
        self._last = self._clock()

    def problem(self) -> str | None:
        quiet = self._clock() - self._last
        if quiet < self.stall_s or self._busy():
            return None
        try:
            waiting = self._waiting()
        except Exception:  # the broker is away: the sweep and the consumer reconnect, a restart would not help
            return None
        if waiting <= 0:
            return None
        return f"{waiting} messages wait and this worker has taken none for {quiet:.0f} s, with a free slot"


class Heartbeat:
    """Touches a file every `interval_s` seconds from a daemon thread until stopped."""

    def __init__(self, path: str | os.PathLike[str], interval_s: float = HEARTBEAT_INTERVAL_S) -> None:
        self.path = Path(path)
        self.interval_s = interval_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qvq-heartbeat", daemon=True)

    def start(self) -> Heartbeat:
        self.beat()
        self._thread.start()
        return self

    def beat(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
        except OSError as exc:
            log.warning("heartbeat.unwritable", path=str(self.path), error=str(exc))

    def stop(self) -> None:
        self._stopped.set()
        if self._thread.is_alive():
            self._thread.join(self.interval_s + 1)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self.beat()
