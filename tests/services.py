"""Real services for the tests: Redis (the machine's or an embedded one), PostgreSQL when reachable,
and Celery worker processes running the real worker code."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from contracts.job import QUEUE
from producer.local.embedded import redis_reachable, stop_process_group
from producer.local.worker_command import worker_command
from tests.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent
#: The PostgreSQL server the tests create their own database on (QVQ_TEST_POSTGRES_URL overrides).
LOCAL_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def postgres_server_url() -> str | None:
    """A reachable PostgreSQL server to create throwaway databases on; None when there is none."""
    url = os.environ.get("QVQ_TEST_POSTGRES_URL", LOCAL_POSTGRES)
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
        return url
    except Exception:
        return None


class ThrowawayPostgres:
    """A database of the test run's own (`qvq_test_<random>`), created on the server and dropped at
    the end: the tests never empty a database they did not create."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.name = f"qvq_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        self.url = str(sa.engine.make_url(server_url).set(database=self.name))
        self._admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT",
                                       connect_args={"connect_timeout": 5})
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))

    def reset(self) -> None:
        """Empty it for the next test (it is ours)."""
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{self.name}"'))

    def drop(self) -> None:
        with self._admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))
        self._admin.dispose()


def shared_redis_url() -> str | None:
    """QVQ_TEST_REDIS_URL, when set: a Redis the tests may use and empty (else each run starts its own).

    Under pytest-xdist, process gwN takes the URL's database number + N, so the processes of one run
    never empty each other's database."""
    url = os.environ.get("QVQ_TEST_REDIS_URL")
    if url:
        url = _database_for_this_process(url)
    if url and not redis_reachable(url):
        raise RuntimeError("QVQ_TEST_REDIS_URL does not answer, or lacks this test process's database "
                           f"({urllib.parse.urlsplit(url).path.strip('/')})")
    return url


def _database_for_this_process(url: str) -> str:
    index = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    parts = urllib.parse.urlsplit(url)
    base = int(parts.path.strip("/") or 0)
    return urllib.parse.urlunsplit(parts._replace(path=f"/{base + index}"))


#: Where worker logs go: the run's pytest temporary directory (set by conftest; pytest keeps the last
#: three runs' and deletes older ones), else the system's temporary directory.
LOG_DIR: Path | None = None


class WorkerProcess:
    """`celery worker` for the project's app in a child process, its log kept in a file."""

    def __init__(self, env: dict[str, str], *, concurrency: int = 20, name: str = "w1") -> None:
        self.env = {**os.environ, "QVQ_METRICS_PORT": "0", **env, "LOG_FORMAT": "json",
                    "LOG_LEVEL": env.get("LOG_LEVEL", "INFO"),
                    "PYTHONPATH": str(REPO)}
        self.concurrency = concurrency
        self.name = name
        self.log_path = Path(tempfile.mkstemp(prefix=f"qvq-worker-{name}-", suffix=".log", dir=LOG_DIR)[1])
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: float = 30.0) -> WorkerProcess:
        args = worker_command(concurrency=self.concurrency, queue=self.env.get("QVQ_QUEUE") or QUEUE,
                              name=f"{self.name}-{os.getpid()}-{time.monotonic_ns()}@%h", heartbeat=False)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=REPO, start_new_session=True)
        log.close()
        self._wait_for("worker.ready", wait_ready)
        return self

    def _wait_for(self, event: str, timeout: float) -> None:
        def logged() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"worker exited at start:\n{self.log()[-4000:]}")
            return bool(self.log_events(event))

        wait_until(logged, timeout, "worker not ready", poll_s=0.05, detail=lambda: self.log()[-4000:])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_events(self, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
        """The worker's log as data (it logs JSON lines): every line, or those of `event` with `fields`."""
        return select_log_events(self.log(), event, **fields)

    def kill(self) -> None:
        """SIGKILL: what an OOM kill or a lost node looks like."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        stop_process_group(self.process, timeout)

    def __enter__(self) -> WorkerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_thread(target: object) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)  # type: ignore[arg-type]
    thread.start()
    return thread


def select_log_events(text: str, event: str | None = None, **fields: Any) -> list[dict[str, Any]]:
    """The JSON log lines of `text` as dicts: all of them, or those of `event` whose fields match."""
    found = []
    for line in text.splitlines():
        if not line.startswith("{"):
            continue
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if (event is None or entry.get("event") == event) and all(entry.get(k) == v for k, v in fields.items()):
            found.append(entry)
    return found
