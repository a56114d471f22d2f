"""Baseline with no queue: N threads in one process stream the stamping emulator through one openai
client (the floor for delay), each token's delay = arrival in the SDK's iterator - emulator send time.
`--lean` reads the same stream with worker.stream.chunks.ChunkStream (the worker's reader) instead of the SDK's.

    python -m bench.direct --url http://127.0.0.1:8001/v1 --n 50   # prints one JSON object
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from typing import Any

import httpx
import openai
import psutil

from bench.stamp_emulator import stamps
from bench.subscriber import percentiles
from worker.stream.chunks import ChunkStream


def run(url: str, n: int, lean: bool = False) -> dict[str, object]:
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    client = openai.OpenAI(api_key="x", base_url=url, max_retries=0,
                           http_client=httpx.Client(timeout=httpx.Timeout(120.0), limits=limits))
    delays: list[list[float]] = [[] for _ in range(n)]
    rates: list[tuple[float, float]] = []
    errors: list[str] = []
    barrier = threading.Barrier(n)

    def one(i: int) -> None:
        barrier.wait()
        first_sent = first_recv = last_sent = last_recv = 0.0
        count = 0
        try:
            kwargs: dict[str, Any] = {"model": "qvq-max", "stream": True, "stream_options": {"include_usage": True},
                                      "messages": [{"role": "user", "content": "Describe the picture."}]}
            stream: Any = (ChunkStream(client.chat.completions.with_streaming_response.create(**kwargs)) if lean
                           else client.chat.completions.create(**kwargs))
            for chunk in stream:
                now = time.time()
                for choice in chunk.choices:
                    text = getattr(choice.delta, "reasoning_content", None) or choice.delta.content or ""
                    for sent in stamps(text):
                        delays[i].append((now - sent) * 1000)
                        count += 1
                        if not first_sent:
                            first_sent, first_recv = sent, now
                        last_sent, last_recv = sent, now
        except Exception as exc:  # reported, not raised: a baseline row says what failed
            errors.append(f"{type(exc).__name__}: {exc}")
            return
        if count > 1:
            rates.append(((count - 1) / (last_sent - first_sent), (count - 1) / (last_recv - first_recv)))

    me = psutil.Process()
    cpu0 = sum(me.cpu_times()[:2])
    t0 = time.monotonic()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    cpu = sum(me.cpu_times()[:2]) - cpu0
    flat = [d for per in delays for d in per]
    return {
        "n": n, "tokens": len(flat), "errors": errors[:5], "error_count": len(errors),
        "delay_ms": percentiles(flat),
        "stream_tps_generated": round(sum(r[0] for r in rates) / len(rates), 2) if rates else None,
        "stream_tps_delivered": round(sum(r[1] for r in rates) / len(rates), 2) if rates else None,
        "cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "cpu_pct": round(100 * cpu / wall, 1),
        "peak_rss_mb": round(me.memory_info().rss / 2**20, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--lean", action="store_true", help="read the stream with worker.sse, as the worker does")
    args = parser.parse_args()
    print(json.dumps(run(args.url, args.n, args.lean)))


if __name__ == "__main__":
    main()
