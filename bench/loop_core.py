"""The worker's streaming core against hand-written peers, side by side in one run (issue: one event loop
owns the waiting).

For each case (N streams x M chunks at R chunks/s, from the plain emulator in its own process):

- worker:  a real `celery worker` (threads pool, -c N+10) runs N tasks submitted through the producer;
           its process CPU / chunks delivered is the cost per chunk (fixed per-task costs included).
- async:   AsyncOpenAI + redis.asyncio, one PUBLISH per chunk, N coroutines in one process.
- threads: the openai SDK in N threads + redis-py, one PUBLISH per chunk.
- floor:   raw asyncio sockets: HTTP/1.1 POST, SSE lines, `json.loads` per chunk, nothing published.

Each peer runs in a process of its own (`python -m bench.loop_core --peer ...`). Pace = the ideal stream
time (M / R) / the measured one (first to last chunk), averaged over streams; exact = every completed
task's persisted thinking and answer equal the concatenation of its published deltas (nothing lost,
doubled or reordered between the stream, the events and the row). The load average before each row is
printed with it.

    python -m bench.loop_core --cases 100x1000@20,400x200@20,2000x20@2 [--only worker,async]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import psutil

ANSWER = 10  # answer chunks per stream; the rest is thinking


def _prompt() -> list[dict[str, str]]:
    return [{"role": "user", "content": "Describe the picture."}]


# -- peers (each in its own process) -----------------------------------------------------------------
async def _peer_async(url: str, redis_url: str, n: int) -> int:
    import httpx
    import openai
    import redis.asyncio as aioredis

    client = openai.AsyncOpenAI(api_key="x", base_url=url, max_retries=0,
                                http_client=httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=None)))
    r = aioredis.Redis.from_url(redis_url, max_connections=n + 10)

    async def one(i: int) -> int:
        count = 0
        stream = await client.chat.completions.create(model="qvq-max", stream=True, messages=_prompt())  # type: ignore[call-overload]
        async for chunk in stream:
            for choice in chunk.choices:
                text = getattr(choice.delta, "reasoning_content", None) or choice.delta.content
                if text:
                    count += 1
                    await r.publish(f"bench:{i}", text)
        return count

    return sum(await asyncio.gather(*(one(i) for i in range(n))))


def _peer_threads(url: str, redis_url: str, n: int) -> int:
    import httpx
    import openai
    import redis

    client = openai.OpenAI(api_key="x", base_url=url, max_retries=0,
                           http_client=httpx.Client(timeout=120, limits=httpx.Limits(max_connections=n + 10)))
    r = redis.Redis.from_url(redis_url, max_connections=n + 10)
    counts = [0] * n

    def one(i: int) -> None:
        for chunk in client.chat.completions.create(model="qvq-max", stream=True, messages=_prompt()):  # type: ignore[call-overload]
            for choice in chunk.choices:
                text = getattr(choice.delta, "reasoning_content", None) or choice.delta.content
                if text:
                    counts[i] += 1
                    r.publish(f"bench:{i}", text)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts)


async def _peer_floor(url: str, n: int) -> int:
    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    body = json.dumps({"model": "qvq-max", "stream": True, "messages": _prompt()}).encode()
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
               f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body

    async def one() -> int:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(request)
        count = 0
        while line := await reader.readline():
            if line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    delta = choice.get("delta") or {}
                    if delta.get("reasoning_content") or delta.get("content"):
                        count += 1
        writer.close()
        return count

    return sum(await asyncio.gather(*(one() for _ in range(n))))


def peer_main(kind: str, url: str, redis_url: str, n: int) -> None:
    import httpx  # noqa: F401 - imported before the clock starts: import time is not per-chunk cost
    import openai  # noqa: F401
    import redis.asyncio  # noqa: F401

    me = psutil.Process()
    cpu0, t0 = sum(me.cpu_times()[:2]), time.monotonic()
    if kind == "async":
        chunks = asyncio.run(_peer_async(url, redis_url, n))
    elif kind == "threads":
        chunks = _peer_threads(url, redis_url, n)
    else:
        chunks = asyncio.run(_peer_floor(url, n))
    print(json.dumps({"chunks": chunks, "cpu_s": sum(me.cpu_times()[:2]) - cpu0, "wall_s": time.monotonic() - t0,
                      "rss_mb": me.memory_info().rss / 2**20}))


# -- the run ------------------------------------------------------------------------------------------
def run_peer(kind: str, url: str, redis_url: str, n: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "bench.loop_core", "--peer", kind, "--url", url, "--redis", redis_url,
                          "--n", str(n)], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def run_worker(url: str, redis_url: str, n: int, chunks: int, rate: float, tmp: Path) -> dict[str, Any]:
    from bench.services import Sampler, Worker
    from contracts import events as ev
    from contracts.bus import EventBus
    from contracts.settings import Settings
    from producer.client import Client

    image = tmp / "a.png"
    if not image.exists():
        from PIL import Image
        Image.new("RGB", (64, 48), (200, 30, 30)).save(image)
    env = {"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp / uuid.uuid4().hex}.db", "QVQ_BASE_URL": url,
           "QVQ_ALLOW_LOCAL_FILES": "1", "QVQ_TASK_TIMEOUT_S": "1800", "LOG_LEVEL": "INFO",
           "QVQ_QUEUE": f"bench-{uuid.uuid4().hex[:6]}"}
    settings = Settings.from_env(env)
    with Worker(env, concurrency=n + 10, name="loop") as worker:
        client = Client(settings)
        base_rss = sum(p.memory_info().rss for p in worker.processes())
        with Sampler(worker.processes()) as sampler:
            ids = [client.submit(images=[str(image)], prompt="Describe the picture.").task_id for _ in range(n)]
            deadline = time.monotonic() + chunks / rate * 4 + 120
            while time.monotonic() < deadline:
                if sum(1 for r in client.store.list_tasks(limit=100_000) if r.is_terminal) >= n:
                    break
                time.sleep(0.5)
        summary = sampler.summary()
        bus = EventBus(client.bus.redis)
        paces, exact, delivered = [], 0, 0
        for task_id in ids:
            events = bus.read_log(task_id)
            deltas = [e for e in events if e["type"] in (ev.REASONING_DELTA, ev.ANSWER_DELTA)]
            record = client.store.get(task_id)
            sent = int((record.usage or {}).get("completion_tokens", 0)) if record is not None else 0  # one per chunk
            if deltas and len(deltas) > 1 and sent:
                paces.append(min(1.0, (sent / rate) / max(1e-6, deltas[-1]["ts"] - deltas[0]["ts"] + 1 / rate)))
            answer = "".join(e["text"] for e in deltas if e["type"] == ev.ANSWER_DELTA)
            reasoning = "".join(e["text"] for e in deltas if e["type"] == ev.REASONING_DELTA)
            if record is not None and record.status == "completed" and record.answer == answer and \
                    record.reasoning == reasoning and len(answer) > 0 and len(reasoning) > 0:
                exact += 1
            delivered += sent if record is not None and record.status == "completed" else 0
        client.close()
    return {"chunks": delivered, "cpu_s": summary["cpu_s"], "wall_s": summary.get("wall_s"),
            "rss_mb": summary["peak_rss_mb"], "rss_growth_mb": round(summary["peak_rss_mb"] - base_rss / 2**20, 1),
            "pace_pct": round(100 * sum(paces) / len(paces), 1) if paces else None, "exact": f"{exact}/{n}"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--peer")
    parser.add_argument("--url")
    parser.add_argument("--redis")
    parser.add_argument("--n", type=int)
    parser.add_argument("--cases", default="100x1000@20,400x200@20")
    parser.add_argument("--only", default="worker,async,threads,floor")
    args = parser.parse_args()
    if args.peer:
        peer_main(args.peer, args.url, args.redis, args.n)
        return
    from bench.services import Emulator
    from producer.local.embedded import EmbeddedRedis

    print("| case | variant | chunks | CPU us/chunk | x floor | pace % | exact | RSS MB (growth) | load avg |")
    print("|---|---|---|---|---|---|---|---|---|")
    with EmbeddedRedis() as redis_server, tempfile.TemporaryDirectory() as tmp:
        for case in args.cases.split(","):
            shape, rate_text = case.split("@")
            n, chunks = (int(v) for v in shape.split("x"))
            rate = float(rate_text)
            floor_us = None
            with Emulator(tps=rate, first_token_s=0.5, reasoning_tokens=chunks - ANSWER, answer_tokens=ANSWER,
                          stamp=False) as emulator:
                for kind in ["floor", *[k for k in args.only.split(",") if k != "floor"]]:
                    if kind not in args.only.split(",") and kind != "floor":
                        continue
                    load = os.getloadavg()[0]
                    row = (run_worker(emulator.url, redis_server.url, n, chunks, rate, Path(tmp)) if kind == "worker"
                           else run_peer(kind, emulator.url, redis_server.url, n))
                    us = 1e6 * row["cpu_s"] / max(1, row["chunks"])
                    if kind == "floor":
                        floor_us = us
                    ratio = f"{us / floor_us:.1f}" if floor_us else "-"
                    rss = f"{row['rss_mb']:.0f}" + (f" (+{row['rss_growth_mb']:.0f})" if "rss_growth_mb" in row else "")
                    print(f"| {case} | {kind} | {row['chunks']} | {us:.0f} | {ratio} | {row.get('pace_pct', '-')} | "
                          f"{row.get('exact', '-')} | {rss} | {load:.2f} |", flush=True)


if __name__ == "__main__":
    main()
