"""A worker's liveness and readiness signals: the metrics endpoint and the heartbeat file appear once it
consumes, the heartbeat goes away when it stops, and a metrics port already taken never stops a worker."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.errors import ConfigError
from contracts.settings import Settings
from tests.ops import free_port
from tests.waiting import wait_until
from worker.ops.health import Heartbeat

pytestmark = pytest.mark.timeout(60)


def test_a_consuming_worker_serves_metrics_and_beats_until_it_stops(start_worker: Any, tmp_path: Path) -> None:
    beat = tmp_path / "run" / "heartbeat"
    port = free_port()
    worker = start_worker(QVQ_METRICS_PORT=str(port), QVQ_HEARTBEAT_FILE=str(beat))
    wait_until(lambda: worker.log_events("metrics.serving"))  # after the heartbeat, just after worker.ready
    assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    assert beat.exists() and time.time() - beat.stat().st_mtime < 30
    worker.stop()
    assert not beat.exists()


def test_a_metrics_port_in_use_is_logged_and_the_worker_runs_on(start_worker: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))  # what the worker binds: every interface
        taken.listen()
        port = taken.getsockname()[1]
        worker = start_worker(QVQ_METRICS_PORT=str(port))
        wait_until(lambda: worker.log_events("metrics.unavailable"))
        assert worker.process is not None and worker.process.poll() is None


def test_heartbeat_touches_its_file_until_stopped(tmp_path: Path) -> None:
    path = tmp_path / "beat"
    heartbeat = Heartbeat(path, interval_s=0.05).start()
    first = path.stat().st_mtime_ns
    deadline = time.monotonic() + 5
    while path.stat().st_mtime_ns == first:
        assert time.monotonic() < deadline, "the heartbeat did not touch its file again"
        time.sleep(0.01)
    heartbeat.stop()
    assert not path.exists()


def test_metrics_port_setting_accepts_zero_and_refuses_a_non_port() -> None:
    assert Settings.from_env({}).metrics_port == 9808
    assert Settings.from_env({"QVQ_METRICS_PORT": "0"}).metrics_port == 0
    with pytest.raises(ConfigError, match="QVQ_METRICS_PORT"):
        Settings.from_env({"QVQ_METRICS_PORT": "70000"})
