"""Batches at volume: prints a table.

    .venv/bin/python -m bench.batches [--items 10000] [--workers 3] [--database postgresql://...]

1. N distinct small PNGs are put in a local S3 server (SeaweedFS, else moto).
2. submit: POST /v1/batches with the N refs (one request), timed until 202; then a dry run of the same
   objects as a prefix (listing + a ranged read of each header), timed.
3. run: the workers start (after the submit, which has the machine to itself), and the batch runs to
   batch.completed through W worker processes (threads pool) against the stamping emulator; wall time,
   items/s, and the machine's CPU per item (every process).
4. results: GET /v1/batches/{id}/results (JSON Lines) streamed, the API's RSS sampled while it streams;
   every line checked against the task rows in the database (status, answer, order).

The API runs as `qvq api` in its own process. The database is a throwaway PostgreSQL database when
--database names a server (created, dropped at the end), else a SQLite file.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import psutil
import sqlalchemy as sa
from botocore.config import Config
from PIL import Image

from bench.api_limits import PeakRss
from bench.services import Emulator, Worker, wait_port
from producer.local.embedded import EmbeddedRedis, free_port, stop_process_group
from tests.s3server import S3Server
from tests.services import ThrowawayPostgres

BUCKET = "bench-batches"


def png(number: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (56 + number % 7 * 28, 56), (number % 251, number // 251 % 251, 120)).save(out, "PNG")
    return out.getvalue()


def put_images(s3: S3Server, count: int) -> list[str]:
    s3.create_bucket(BUCKET)
    client = s3.client(config=Config(s3={"addressing_style": "path"}, max_pool_connections=32))  # one client
    keys = [f"shift/{number:06d}.png" for number in range(count)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=BUCKET, Key=item[1], Body=png(item[0])),
                      enumerate(keys)))
    return [f"s3://{BUCKET}/{key}" for key in keys]


def follow_to_end(url: str, batch_id: str, timeout: float) -> dict[str, Any]:
    last: dict[str, Any] = {}
    with httpx.stream("GET", f"{url}/v1/batches/{batch_id}/events", timeout=httpx.Timeout(timeout)) as response:
        for line in response.iter_lines():
            if line.startswith("data:"):
                last = json.loads(line[5:])
                print(f"\r  {last['done']:>6}/{last['items']} done, {last['rate']:.1f}/s", end="", flush=True)
    print()
    return last


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=100, help="threads per worker")
    parser.add_argument("--database", default=os.environ.get("QVQ_BENCH_POSTGRES", ""),
                        help="a PostgreSQL server URL (a throwaway database is made on it)")
    args = parser.parse_args()
    rows: list[tuple[str, str]] = []
    database = ThrowawayPostgres(args.database) if args.database else None
    with EmbeddedRedis() as redis_server, S3Server() as s3, tempfile.TemporaryDirectory() as tmp, \
            Emulator(tps=200, first_token_s=0.05, reasoning_tokens=20, answer_tokens=10, stamp=False) as emulator:
        db_url = database.url if database else f"sqlite:///{tmp}/qvq.db"
        print(f"putting {args.items:,} images ...", flush=True)
        refs = put_images(s3, args.items)
        port = free_port()
        env = {**os.environ, "REDIS_URL": redis_server.url, "DATABASE_URL": db_url, "QVQ_BASE_URL": emulator.url,
               "S3_ENDPOINT_URL": s3.endpoint_url, "AWS_ACCESS_KEY_ID": s3.access_key,
               "AWS_SECRET_ACCESS_KEY": s3.secret_key, "AWS_DEFAULT_REGION": s3.region,
               "QVQ_MAX_REQUEST_BYTES": str(4 << 20), "QVQ_FLOW_CONTROL": "0"}
        api = subprocess.Popen([sys.executable, "-m", "producer.cli", "api", "--port", str(port)],
                               env={**env, "LOG_LEVEL": "WARNING"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        workers = [Worker({**env, "LOG_LEVEL": "INFO"}, concurrency=args.concurrency, name=f"w{n}")
                   for n in range(args.workers)]
        try:
            wait_port(port, process=api)
            url = f"http://127.0.0.1:{port}"
            started = time.perf_counter()  # the workers start after: the submit has the machine to itself
            created = httpx.post(f"{url}/v1/batches", json={"items": refs, "prompt": "What colour?",
                                                             "model": "qvq-plus"}, timeout=600)
            submit_s = time.perf_counter() - started
            assert created.status_code == 202, created.text
            batch_id = created.json()["batch_id"]
            rows.append((f"submit {args.items:,} refs (POST until 202, no worker running)", f"{submit_s:.2f} s"))
            for worker in workers:
                worker.start()
            started, busy = time.perf_counter(), _busy_cpu_s()
            last = follow_to_end(url, batch_id, timeout=3600)
            run_s, cpu_s = time.perf_counter() - started, _busy_cpu_s() - busy
            rows.append((f"run to batch.completed, {args.workers} workers x {args.concurrency} threads",
                         f"{run_s:.1f} s, {args.items / run_s:.0f} items/s, counts {last.get('counts')}"))
            rows.append(("machine CPU per item while it ran (every process)",
                         f"{cpu_s / args.items * 1000:.1f} ms ({psutil.cpu_count()} cores)"))
            started = time.perf_counter()
            dry = httpx.post(f"{url}/v1/batches", json={"source": f"s3://{BUCKET}/shift/", "prompt": "What colour?",
                                                         "model": "qvq-plus", "dry_run": True}, timeout=600)
            rows.append((f"dry run of the prefix ({dry.json()['items']:,} objects: list + header reads)",
                         f"{time.perf_counter() - started:.2f} s, {dry.json()['estimate']['unread']} unread"))
            idle = psutil.Process(api.pid).memory_info().rss
            lines: list[dict[str, Any]] = []
            with PeakRss(api.pid) as peak:
                started = time.perf_counter()
                with httpx.stream("GET", f"{url}/v1/batches/{batch_id}/results", timeout=600) as response:
                    lines = [json.loads(line) for line in response.iter_lines() if line]
                stream_s = time.perf_counter() - started
            rows.append((f"results: {len(lines):,} JSON lines streamed", f"{stream_s:.2f} s"))
            rows.append(("API RSS before / peak while streaming", f"{idle / 1048576:.1f} / {peak.peak / 1048576:.1f} MB"))
            rows.append(("result lines exact (against the task rows)", check(lines, refs, db_url)))
        finally:
            for worker in workers:
                worker.stop()
            stop_process_group(api)
            if database is not None:
                database.drop()
    print(f"\n{'measure':<64} value")
    for name, value in rows:
        print(f"{name:<64} {value}")


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine spent busy so far (every process: workers, API, Redis, database)."""
    times = psutil.cpu_times()
    return float(times.user + times.system + getattr(times, "nice", 0.0) + getattr(times, "irq", 0.0)
                 + getattr(times, "softirq", 0.0))


def check(lines: list[dict[str, Any]], refs: list[str], db_url: str) -> str:
    engine = sa.create_engine(db_url)
    with engine.connect() as conn:
        answers = dict(conn.execute(sa.text("SELECT id, answer FROM qvq_tasks WHERE status = 'completed'")).all())
    engine.dispose()
    wrong = [line for line in lines if line["status"] != "completed" or answers.get(line["task_id"]) != line["answer"]
             or not line["answer"]]
    in_order = [line["ref"] for line in lines] == refs
    return f"{len(lines) - len(wrong):,}/{len(refs):,} exact, in submit order: {in_order}"


if __name__ == "__main__":
    main()
