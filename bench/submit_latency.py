"""Submit-to-first-event latency through each way in: the Python client over Redis, the HTTP client
(POST /v1/tasks, then SSE), and an object-created notification (POST /v1/webhooks/objects, then SSE).

    python -m bench.submit_latency [--tasks 200] [--concurrency 20]

For each task: t0 just before the submit call; `queued` when the caller sees the task's first event
(task.queued) on its own event stream; `started` when it sees task.started (a worker took it). Tasks run
one after another (the latency of an idle system, not of a loaded one). Prints p50 / p99 in ms.
Everything runs on this machine: embedded Redis, SQLite, the S3 test server, the emulator, one worker.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench.services import Emulator, Worker
from contracts.settings import Settings
from producer.client import Client
from producer.http_client import HttpClient
from producer.local.embedded import EmbeddedRedis
from tests.imagegen import make_image
from tests.producer import ApiServer
from tests.s3server import S3Server

KEY = "bench-admin-key-0123456789abcdef"
BUCKET = "bench-photos"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def first_events(events: Iterator[dict[str, Any]], t0: float) -> tuple[float, float]:
    queued = started = 0.0
    for event in events:
        if event["type"] == "task.queued" and not queued:
            queued = time.perf_counter() - t0
        if event["type"] == "task.started":
            started = time.perf_counter() - t0
            break
    return queued, started


def run_path(name: str, submit: Callable[[int], tuple[str, float]], follow: Callable[[str], Iterator[dict[str, Any]]],
             tasks: int) -> dict[str, Any]:
    queued, started = [], []
    for index in range(tasks):
        task_id, t0 = submit(index)
        q, s = first_events(follow(task_id), t0)
        queued.append(q * 1000)
        started.append(s * 1000)
    return {"path": name, "n": tasks, "queued_p50": percentile(queued, 0.5), "queued_p99": percentile(queued, 0.99),
            "started_p50": percentile(started, 0.5), "started_p99": percentile(started, 0.99),
            "started_mean": statistics.fmean(started)}


def minio_event(key: str) -> dict[str, Any]:
    return {"EventName": "s3:ObjectCreated:Put", "Key": f"{BUCKET}/{key}", "Records": [{
        "eventName": "s3:ObjectCreated:Put", "eventSource": "minio:s3",
        "s3": {"bucket": {"name": BUCKET}, "object": {"key": key, "eTag": uuid.uuid4().hex, "size": 1}}}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=200)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="qvq-bench-latency-"))
    with EmbeddedRedis() as redis_server, S3Server() as s3, \
            Emulator(tps=0, first_token_s=0, reasoning_tokens=4, answer_tokens=2) as emulator:
        s3.create_bucket(BUCKET)
        s3.put(BUCKET, "a.png", make_image("PNG", size=(64, 48)), "image/png")
        env = {"REDIS_URL": redis_server.url, "DATABASE_URL": f"sqlite:///{workdir / 'qvq.db'}",
               "QVQ_BASE_URL": emulator.url, "S3_ENDPOINT_URL": s3.endpoint_url,
               "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
               "AWS_DEFAULT_REGION": s3.region, "QVQ_API_KEYS": KEY,
               "QVQ_TRIGGERS": f'[{{"bucket": "{BUCKET}", "prompt": "What is it?"}}]'}
        settings = Settings.from_env(env)
        api_server = ApiServer(settings, keepalive_s=5)
        # As `qvq api` (uvicorn binding its own socket) does: without TCP_NODELAY on the socket handed to
        # uvicorn, Nagle's algorithm holds each SSE stream's first frame ~40 ms (a delayed ACK).
        api_server._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with Worker({**env, "LOG_LEVEL": "INFO"}, concurrency=20, name="latency"), api_server as api, \
                Client(settings) as client, HttpClient(api.url, KEY) as http:
            import httpx

            ref = f"s3://{BUCKET}/a.png"
            hooks = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=30)

            def via_redis(_: int) -> tuple[str, float]:
                t0 = time.perf_counter()
                return client.submit(images=[ref], prompt="What is it?").task_id, t0

            def via_http(_: int) -> tuple[str, float]:
                t0 = time.perf_counter()
                return http.submit(images=[ref], prompt="What is it?").task_id, t0

            def via_notification(index: int) -> tuple[str, float]:
                t0 = time.perf_counter()
                answer = hooks.post("/v1/webhooks/objects", json=minio_event("a.png")).json()
                return answer["tasks"][0]["task_id"], t0

            rows = [run_path("python client (Redis)", via_redis, lambda t: client.events(t, timeout=30), args.tasks),
                    run_path("HTTP client (POST + SSE)", via_http, lambda t: http.events(t, timeout=30), args.tasks),
                    run_path("object notification (+ SSE)", via_notification, lambda t: http.events(t, timeout=30),
                             args.tasks)]
            hooks.close()
    print(f"submit -> first event latency, {args.tasks} tasks per path, one at a time (ms)")
    print(f"{'path':32} {'queued p50':>11} {'queued p99':>11} {'started p50':>12} {'started p99':>12}")
    for row in rows:
        print(f"{row['path']:32} {row['queued_p50']:11.1f} {row['queued_p99']:11.1f} "
              f"{row['started_p50']:12.1f} {row['started_p99']:12.1f}")


if __name__ == "__main__":
    main()
