"""How a worker shows it is alive and consuming: its Prometheus endpoint and a heartbeat file.

- QVQ_METRICS_PORT (default 9808, 0 = off): Prometheus text on every path of that port, served by a
  thread of the worker process (Celery's threads pool: one process serves every stream). Answering is
  the worker's liveness (an HTTP probe on it).
- QVQ_HEARTBEAT_FILE (default off): touched every HEARTBEAT_INTERVAL_S seconds once the worker consumes
  (after worker_ready), removed at shutdown. A fresh file is the worker's readiness (an exec probe:
  `find FILE -mmin -1`), and serves as liveness where no port may be opened.
Both start at worker_ready and never stop the worker from starting: a port in use is logged.
"""

from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Any

from contracts.logging import get_logger
from contracts.metrics import WORKER_REGISTRY, serve_registry

log = get_logger(__name__)

HEARTBEAT_INTERVAL_S = 5.0


def serve_metrics(port: int, host: str = "0.0.0.0") -> Any:
    """Start the worker's metrics endpoint; the server, or None when it is off or its port is taken."""
    return serve_registry(WORKER_REGISTRY, port, host)


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
