"""The HTTP API under hostile bodies and with keys on: prints a table.

    .venv/bin/python bench/api_limits.py [--tasks 200]

- peak RSS of the API process while a 300 MB body is sent to POST /v1/tasks (with and without
  Content-Length) and a 300 MB upload to POST /v1/uploads (with a valid key, and with none);
- submit latency (POST /v1/tasks with a tenant key, JSON body, until 202) p50/p99 over N tasks.

The API runs as `qvq api` in its own process on an embedded Redis and a SQLite file; nothing else.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.services import wait_port  # noqa: E402
from producer.local.embedded import EmbeddedRedis, free_port, stop_process_group  # noqa: E402

KEY = "bench-key-0123456789abcdef"
BODY_MB = 300


def chunks(total: int, size: int = 1 << 20, head: bytes = b"") -> Iterator[bytes]:
    if head:
        yield head
    block = b" " * size
    for _ in range(total // size):
        yield block


#: The start of a well-formed multipart body whose one file part then runs on for 300 MB.
FILE_PART = b'--b\r\nContent-Disposition: form-data; name="file"; filename="x.png"\r\nContent-Type: image/png\r\n\r\n'



class PeakRss:
    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self.peak = self.process.memory_info().rss
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop.clear()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    with EmbeddedRedis() as redis_server, tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        env = {**os.environ, "REDIS_URL": redis_server.url, "DATABASE_URL": f"sqlite:///{tmp}/qvq.db",
               "QVQ_API_KEYS": f"acme:{KEY}", "QVQ_UPLOAD_URL": f"{tmp}/uploads", "LOG_LEVEL": "WARNING"}
        api = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            wait_port(port, process=api)
            url = f"http://127.0.0.1:{port}"
            rows = [("idle", "-", psutil.Process(api.pid).memory_info().rss)]
            auth = {"Authorization": f"Bearer {KEY}"}
            cases = [
                ("300 MB JSON, Content-Length", "/v1/tasks", {**auth, "Content-Type": "application/json",
                                                               "Content-Length": str(BODY_MB << 20)}),
                ("300 MB JSON, chunked", "/v1/tasks", {**auth, "Content-Type": "application/json"}),
                ("300 MB upload, valid key", "/v1/uploads", {**auth, "Content-Type": "multipart/form-data; boundary=b"}),
                ("300 MB upload, no key", "/v1/uploads", {"Content-Type": "multipart/form-data; boundary=b"}),
            ]
            for name, path, headers in cases:
                head = FILE_PART if path == "/v1/uploads" else b""
                with PeakRss(api.pid) as peak:
                    try:
                        response = httpx.post(url + path, content=chunks(BODY_MB << 20, head=head), headers=headers,
                                              timeout=60)
                        status = str(response.status_code)
                    except httpx.HTTPError as exc:  # the server may close the connection after answering
                        status = f"closed ({type(exc).__name__})"
                rows.append((name, status, peak.peak))
            latencies = []
            with httpx.Client(base_url=url, headers=auth, timeout=30) as client:
                for i in range(args.tasks):
                    started = time.perf_counter()
                    response = client.post("/v1/tasks", json={"images": ["s3://photos/a.png"], "prompt": f"q{i}"})
                    latencies.append(time.perf_counter() - started)
                    assert response.status_code == 202, response.text
        finally:
            stop_process_group(api)
    print(f"{'case':<32} {'status':<22} {'peak RSS (MB)':>14}")
    for name, status, rss in rows:
        print(f"{name:<32} {status:<22} {rss / 1048576:>14.1f}")
    ordered = sorted(latencies)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(f"\nsubmit with a tenant key, {args.tasks} tasks: p50 {statistics.median(latencies) * 1000:.1f} ms, "
          f"p99 {p99 * 1000:.1f} ms")


if __name__ == "__main__":
    main()
