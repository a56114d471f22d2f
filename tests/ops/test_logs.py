"""Logs as data: with LOG_FORMAT=json every line is a JSON object, from the worker's first line on; lines
about a task carry task_id as a field (Celery's own included); uvicorn access lines are fields with the
API key masked; what a user sent is never logged at INFO."""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
import uvicorn

from contracts.logging import configure
from contracts.settings import Settings
from producer.api import create_app
from tests.imagegen import make_image
from tests.ops import free_port
from tests.reliability import directive
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(90)


def test_every_worker_line_is_json_and_task_lines_carry_the_task_id(
        start_worker: Any, make_client: Any, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(make_image("PNG", size=(64, 48), color=(220, 20, 20)))
    worker = start_worker()
    client = make_client()
    secret = "zebra-quokka-7731"  # a word of the prompt: it must not reach the log
    handles = [client.submit(images=[str(image)], prompt=f"{secret}?", metadata={"note": secret}),
               client.submit(images=[str(image)], prompt=f"{secret} {directive(fault='500@1')}")]
    assert all(h.result(timeout=60).status == "completed" for h in handles)
    ids = {h.task_id for h in handles}
    wait_until(lambda: all(f"{i}] succeeded" in worker.log() for i in ids))
    worker.stop()

    lines = [line for line in worker.log().splitlines() if line.strip()]
    not_json = [line for line in lines if not _is_json(line)]
    assert not_json == [], not_json[:5]
    entries = [json.loads(line) for line in lines]
    events = [e["event"] for e in entries]
    assert "thread.crashed" not in events, [e for e in entries if e["event"] == "thread.crashed"]
    assert "worker.starting" in events and events.index("worker.starting") < events.index("worker.ready")
    about_tasks = [e for e in entries if any(i in json.dumps(e) for i in ids)]
    assert len(about_tasks) >= 6  # received, started, retrying, finished, succeeded...
    for entry in about_tasks:
        assert entry.get("task_id") in ids, entry
    celery_lines = [e for e in about_tasks if e["logger"].startswith("celery")]
    assert {e["task_name"] for e in celery_lines} == {"qvq.reason"}
    assert {e["task_id"] for e in celery_lines} == ids
    assert secret not in worker.log()


@pytest.fixture()
def json_logs() -> Any:
    root = logging.getLogger()
    saved, saved_structlog = (root.handlers[:], root.level), structlog.get_config()
    saved_hook = threading.excepthook
    configure("json", "INFO")
    access = logging.getLogger("uvicorn.access")  # as `qvq api` leaves it (another server in this process
    saved_access = access.propagate, access.level   # may have configured uvicorn's loggers its way)
    access.propagate, access.level = True, logging.NOTSET
    out = io.StringIO()
    root.handlers[0].setStream(out)  # type: ignore[attr-defined]
    yield lambda: [json.loads(line) for line in out.getvalue().splitlines()]
    root.handlers[:], level = saved
    root.setLevel(level)
    access.propagate, access.level = saved_access
    logging.captureWarnings(False)
    structlog.configure(**saved_structlog)
    threading.excepthook = saved_hook


def test_a_crashed_background_thread_is_one_json_line_naming_the_thread(json_logs: Any) -> None:
    def crash() -> None:
        raise ValueError("boom in the background")

    thread = threading.Thread(target=crash, name="publisher-7")
    thread.start()
    thread.join(10)
    [line] = json_logs()
    assert line["event"] == "thread.crashed" and line["thread_name"] == "publisher-7", line
    assert line["level"] == "error" and "ValueError: boom in the background" in line["exception"]


def test_access_lines_are_fields_with_the_api_key_masked(json_logs: Any, redis_url: str, tmp_path: Path) -> None:
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}",
                                  "QVQ_API_KEYS": "acme:k-123-0123456789abcdef"})
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, access_log=True))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started)
        response = httpx.get(f"http://127.0.0.1:{port}/v1/tasks/nope/events?api_key=k-123-0123456789abcdef&x=1")
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()

    access = [e for e in json_logs() if e.get("event") == "http.access"]
    assert len(access) == 1, access
    line = access[0]
    assert line["method"] == "GET" and line["status"] == response.status_code
    assert line["path"] == "/v1/tasks/nope/events?api_key=***&x=1"
    assert line["client"].startswith("127.0.0.1:") and line["http_version"] == "1.1"
    assert isinstance(line["duration_s"], float) and line["duration_s"] >= 0
    assert "k-123" not in json.dumps(access)


def _is_json(line: str) -> bool:
    try:
        json.loads(line)
    except ValueError:
        return False
    return True


def test_qvq_flower_logs_json_lines_and_exports_none_of_the_services_metrics(redis_url: str) -> None:
    port = free_port()
    env = {"PATH": "/usr/bin:/bin", "LOG_FORMAT": "json", "REDIS_URL": redis_url, "HOME": "/tmp"}
    process = subprocess.Popen([sys.executable, "-m", "producer.cli", "flower", f"--port={port}",
                                "--address=127.0.0.1"], env=env, stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                               text=True)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthcheck"), timeout=60)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert "flower_" in metrics and "qvq_" not in metrics
    finally:
        process.terminate()
        out, err = process.communicate(timeout=30)
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert lines and all(json.loads(line)["event"] for line in lines), lines[:5]
    assert any("Visit me at" in json.loads(line)["event"] for line in lines)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.TransportError:
        return False
