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
from worker.ops.health import ConsumerWatch, Heartbeat, serve_metrics

pytestmark = pytest.mark.timeout(60)


def test_a_consuming_worker_serves_metrics_and_beats_until_it_stops(start_worker: Any, tmp_path: Path) -> None:
    beat = tmp_path / "run" / "heartbeat"
    port = free_port()
    worker = start_worker(QVQ_METRICS_PORT=str(port), QVQ_HEARTBEAT_FILE=str(beat))
    wait_until(lambda: worker.log_events("metrics.serving"))  # after the heartbeat, just after worker.ready
    assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
    live = httpx.get(f"http://127.0.0.1:{port}/livez")
    assert live.status_code == 200 and live.text == "ok\n"
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


def test_the_consumer_is_dead_only_when_messages_wait_a_slot_is_free_and_none_was_taken() -> None:
    now, waiting, busy = [0.0], [3], [False]

    def depth() -> int:
        if waiting[0] < 0:
            raise ConnectionError("broker away")
        return waiting[0]

    watch = ConsumerWatch(depth, busy=lambda: busy[0], stall_s=120, clock=lambda: now[0])
    now[0] = 119.0
    assert watch.problem() is None  # not quiet long enough
    now[0] = 121.0
    assert "3 messages wait" in (watch.problem() or "")
    busy[0] = True
    assert watch.problem() is None  # every slot taken: not taking more is right
    busy[0], waiting[0] = False, 0
    assert watch.problem() is None  # nothing waits
    waiting[0] = -1
    assert watch.problem() is None  # the broker is away: a restart would not help
    waiting[0] = 3
    watch.received()
    assert watch.problem() is None


def test_livez_answers_503_with_the_problem_while_metrics_still_answer() -> None:
    problem: list[str | None] = [None]
    watch = ConsumerWatch(lambda: 1, busy=lambda: False, stall_s=0)
    watch.problem = lambda: problem[0]  # type: ignore[method-assign]
    port = free_port()
    server = serve_metrics(port, host="127.0.0.1", consumer=watch)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/livez").status_code == 200
        problem[0] = "5 messages wait and this worker has taken none for 130 s, with a free slot"
        answer = httpx.get(f"http://127.0.0.1:{port}/livez")
        assert answer.status_code == 503 and "5 messages wait" in answer.text
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics")
        assert metrics.status_code == 200 and "qvq_tasks_total" in metrics.text
    finally:
        server.shutdown()
        server.server_close()
