"""The processes a benchmark runs against, each in its own process: Redis, the stamping emulator,
the S3 test server and `celery worker` processes (threads, prefork or gevent pool), plus a sampler of
a worker's CPU time and peak memory."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from contracts.job import QUEUE
from producer.local.embedded import free_port, stop_process_group
from producer.local.worker_command import worker_command

REPO = Path(__file__).resolve().parent.parent


def wait_port(port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited at start (code {process.returncode})")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing answers on port {port} after {timeout:g} s")


class Emulator:
    """bench.stamp_emulator in a child process."""

    def __init__(self, *, tps: float, first_token_s: float, reasoning_tokens: int, answer_tokens: int,
                 stamp: bool = True) -> None:
        self.port = free_port()
        self.tps = tps
        self.args = [sys.executable, "-m", "bench.stamp_emulator", "--port", str(self.port), "--tps", str(tps),
                     "--first-token-s", str(first_token_s), "--reasoning-tokens", str(reasoning_tokens),
                     "--answer-tokens", str(answer_tokens)] + ([] if stamp else ["--plain"])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> Emulator:
        self.process = subprocess.Popen(self.args, cwd=REPO, start_new_session=True,
                                        env={**os.environ, "PYTHONPATH": str(REPO)})
        wait_port(self.port, process=self.process)
        return self

    def __exit__(self, *exc: object) -> None:
        stop_process_group(self.process)

    def stats(self) -> dict[str, int]:
        import httpx

        return httpx.get(f"http://127.0.0.1:{self.port}/_emulator/stats", timeout=5).json()

    def cpu_s(self) -> float:
        if self.process is None:
            return 0.0
        t = psutil.Process(self.process.pid).cpu_times()
        return t.user + t.system


class Worker:
    """`celery -A worker.celery:app worker` in a child process, its log in a file."""

    def __init__(self, env: dict[str, str], *, pool: str = "threads", concurrency: int = 200,
                 name: str = "bench") -> None:
        self.env = {**os.environ, **env, "LOG_FORMAT": "json", "PYTHONPATH": str(REPO),
                    "QVQ_WORKER_CONCURRENCY": str(concurrency)}
        self.env.setdefault("LOG_LEVEL", "WARNING")
        self.pool = pool
        self.concurrency = concurrency
        self.name = name
        fd, path = tempfile.mkstemp(prefix=f"qvq-bench-{name}-", suffix=".log")
        os.close(fd)
        self.log_path = Path(path)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> Worker:
        args = worker_command(concurrency=self.concurrency, queue=self.env.get("QVQ_QUEUE") or QUEUE, pool=self.pool,
                              name=f"{self.name}-{time.monotonic_ns()}@%h", heartbeat=False, loglevel="INFO")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(args, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                            start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log()
            if "ready." in text or "worker.ready" in text:
                return self
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited at start:\n{text[-3000:]}")
            time.sleep(0.05)
        raise RuntimeError(f"worker not ready after {timeout:g} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def processes(self) -> list[psutil.Process]:
        """The worker's main process and its pool children (prefork)."""
        if self.process is None:
            return []
        try:
            main = psutil.Process(self.process.pid)
            return [main, *main.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self) -> None:
        stop_process_group(self.process)

    def __enter__(self) -> Worker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Sampler:
    """Samples the CPU time and resident memory of some processes every `interval` seconds."""

    def __init__(self, processes: list[psutil.Process], interval: float = 0.1) -> None:
        self.processes = processes
        self.interval = interval
        self.peak_rss = 0
        self.rss_samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._cpu0 = self._cpu()
        self._t0 = time.monotonic()
        self.cpu_s = 0.0
        self.wall_s = 0.0
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        total = 0.0
        for p in self.processes:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total

    def rss(self) -> int:
        total = 0
        for p in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += p.memory_info().rss
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            rss = self.rss()
            self.rss_samples.append((time.monotonic() - self._t0, rss))
            self.peak_rss = max(self.peak_rss, rss)

    def __enter__(self) -> Sampler:
        self.peak_rss = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.cpu_s = self._cpu() - self._cpu0
        self.wall_s = time.monotonic() - self._t0

    def summary(self) -> dict[str, Any]:
        return {"cpu_s": round(self.cpu_s, 2), "wall_s": round(self.wall_s, 2),
                "cpu_pct": round(100 * self.cpu_s / self.wall_s, 1) if self.wall_s else None,
                "peak_rss_mb": round(self.peak_rss / 2**20, 1)}
