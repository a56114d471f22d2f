"""SSE fan-out: N viewers of one task on one API process; the delay each event adds on its way.

    python -m bench.sse_fanout 500 1000 2000
    QVQ_BENCH_PROFILE=/tmp/api.txt python -m bench.sse_fanout 1000   # py-spy profile of the API

The API runs in a process of its own (uvicorn, as `qvq api` does), the viewers in another (raw
sockets, so the measuring side stays light), the publisher here. Each viewer replays the log, then
receives EVENTS deltas published every INTERVAL_S and the terminal event; the delay of an event is
its arrival at the viewer minus its `ts` (set when published). Prints one row per viewer count.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import redis

from contracts import events as ev
from contracts.bus import EventBus
from contracts.job import parse_job
from contracts.store import Store
from producer.local.embedded import EmbeddedRedis, free_port

EVENTS = 40
INTERVAL_S = 0.05  # the coalescer's default pace: 20 events a second
_DATA = re.compile(rb"data: (\{.*?\})\n")


async def _viewer(port: int, path: str, ready: Any, delays: list[float], seqs: list[list[int]]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    buffer, mine = b"", []
    while True:
        chunk = await reader.read(65536)
        if not chunk:
            break
        now = time.time()
        buffer += chunk
        end = 0
        for match in _DATA.finditer(buffer):
            event = json.loads(match.group(1))
            end = match.end()
            mine.append(event["seq"])
            if event["seq"] == 1:
                ready.release()
            else:
                delays.append(now - event["ts"])
            if event["type"] in ev.TERMINAL_TYPES:
                writer.close()
                seqs.append(mine)
                return
        buffer = buffer[end:]
    seqs.append(mine)


def _viewers(port: int, path: str, count: int, ready: Any, results: Any) -> None:
    async def main() -> tuple[list[float], list[list[int]]]:
        delays: list[float] = []
        seqs: list[list[int]] = []
        await asyncio.gather(*(_viewer(port, path, ready, delays, seqs) for _ in range(count)))
        return delays, seqs

    results.put(asyncio.run(main()))


def run(count: int, redis_url: str, database_url: str, port: int) -> dict[str, Any]:
    store = Store.from_url(database_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "hi"})
    store.create_task(job)
    store.dispose()
    client = redis.Redis.from_url(redis_url)
    bus = EventBus(client)
    bus.publish(job.task_id, ev.QUEUED, 0, model="qvq-max", image_count=1, run=0)
    ctx = mp.get_context("spawn")
    ready, results = ctx.Semaphore(0), ctx.Queue()
    viewers = ctx.Process(target=_viewers, args=(port, f"/v1/tasks/{job.task_id}/events", count, ready, results))
    viewers.start()
    for _ in range(count):  # every viewer has replayed the log (and is live)
        assert ready.acquire(timeout=120), "the viewers did not connect"
    started = time.monotonic()
    for i in range(EVENTS):
        bus.publish(job.task_id, ev.ANSWER_DELTA, 1, text=f"{i} ")
        time.sleep(INTERVAL_S)
    bus.publish(job.task_id, ev.COMPLETED, 1)
    delays, seqs = results.get(timeout=300)
    viewers.join(30)
    client.close()
    delays.sort()
    expected = list(range(1, EVENTS + 3))
    return {"viewers": count, "complete_and_in_order": sum(s == expected for s in seqs),
            "p50_ms": 1000 * delays[len(delays) // 2], "p99_ms": 1000 * delays[int(len(delays) * 0.99) - 1],
            "max_ms": 1000 * delays[-1], "publish_s": time.monotonic() - started}


def main(counts: list[int]) -> None:
    with EmbeddedRedis() as server, tempfile.TemporaryDirectory() as tmp:
        database_url = f"sqlite:///{Path(tmp) / 'qvq.db'}"
        Store.from_url(database_url).dispose()
        port = free_port()
        env = {**os.environ, "REDIS_URL": server.url, "DATABASE_URL": database_url, "LOG_LEVEL": "WARNING"}
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "producer.api:create_app",
                                "--port", str(port), "--log-level", "warning", "--no-access-log"],
                               env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + 30
            while True:
                try:
                    httpx.get(f"http://127.0.0.1:{port}/livez", timeout=1)
                    break
                except httpx.HTTPError:
                    assert time.monotonic() < deadline, "the API did not start"
                    time.sleep(0.1)
            profile = os.environ.get("QVQ_BENCH_PROFILE")  # a py-spy output file: profile the API process
            spy = subprocess.Popen(["py-spy", "record", "-r", "50", "-f", "raw", "-o", profile, "--pid",
                                    str(api.pid)]) if profile else None
            print("| viewers | complete, in order | p50 added delay | p99 added delay | max |")
            print("|---:|---:|---:|---:|---:|")
            for count in counts:
                row = run(count, server.url, database_url, port)
                print(f"| {row['viewers']} | {row['complete_and_in_order']} | {row['p50_ms']:.1f} ms "
                      f"| {row['p99_ms']:.1f} ms | {row['max_ms']:.1f} ms |", flush=True)
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
        finally:
            api.terminate()
            api.wait(10)


if __name__ == "__main__":
    main([int(arg) for arg in sys.argv[1:]] or [500, 1000, 2000])
