"""Run the benchmark suite: `python -m bench [--quick] [--only fanout,direct,...]`.

Every service runs in its own process: an embedded Redis, the stamping emulator
(bench.stamp_emulator), the S3 test server (tests.s3server), `celery worker` processes, the
subscriber (bench.subscriber) and the no-queue baseline (bench.direct). Prints a table and writes
bench/results/<UTC time>.json. See bench/RESULTS.md for what each number means.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import contextlib

import psutil
import redis

from bench.services import REPO, Emulator, Sampler, Worker
from bench.subscriber import SubscriberProcess, summarize

RESULTS = REPO / "bench" / "results"
EMPTY = {"p50": None, "p99": None, "max": None, "n": 0}
SAMPLE = REPO / "producer" / "samples" / "triangle.png"
SECTIONS = ("fanout", "direct", "idle", "prefork", "short")


class Bench:
    def __init__(self, quick: bool, profile: bool = False) -> None:
        self.quick = quick
        self.profile = profile
        self.sizes: list[int] = []
        self.coalesce = ["50", "0"]
        self.partial: Path | None = None
        self.tmp = tempfile.TemporaryDirectory(prefix="qvq-bench-")
        self.rows: list[dict[str, Any]] = []
        self.redis_server: Any = None
        self.redis_url = ""
        self.s3: Any = None

    # -- shared services ------------------------------------------------------------------------
    def __enter__(self) -> Bench:
        from producer.local.embedded import EmbeddedRedis

        self.redis_server = EmbeddedRedis().start()
        self.redis_url = self.redis_server.url
        self.redis = redis.Redis.from_url(self.redis_url)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.s3 is not None:
            self.s3.stop()
        self.redis_server.close()
        self.tmp.cleanup()

    def env(self, emulator: Emulator, **extra: str) -> dict[str, str]:
        db = Path(self.tmp.name) / f"qvq-{uuid.uuid4().hex[:8]}.db"
        # QVQ_BENCH_DATABASE_URL (e.g. a PostgreSQL URL) replaces the default fresh SQLite file.
        database_url = os.environ.get("QVQ_BENCH_DATABASE_URL") or f"sqlite:///{db}"
        env = {"REDIS_URL": self.redis_url, "DATABASE_URL": database_url, "QVQ_BASE_URL": emulator.url,
               "QVQ_ALLOW_LOCAL_FILES": "1", "QVQ_ALLOW_PRIVATE_URLS": "1", "LOG_LEVEL": "INFO"}
        if self.s3 is not None:
            env.update(self.s3.env())
            env["S3_ENDPOINT_URL"] = self.s3.endpoint_url
        env.update(extra)
        return env

    def redis_commands(self) -> int:
        return int(self.redis.info("stats")["total_commands_processed"])

    # -- one batch through the queue ----------------------------------------------------------------
    def batch(self, env: dict[str, str], workers: list[Worker], n: int, images: list[str], prompt: str,
              timeout: float, label: str = "batch", token_interval_ms: float = 0.0) -> dict[str, Any]:
        """`token_interval_ms`: the emulator's pace, which also sets when a stream ends after its last token."""
        from contracts.settings import Settings
        from producer.client import Client

        self.redis.flushdb()
        ids = [str(uuid.uuid4()) for _ in range(n)]
        sub = SubscriberProcess(self.redis_url, ids, timeout).start()
        settings = Settings.from_env(env)
        submitters = min(8, n)
        clients = [Client(settings) for _ in range(submitters)]
        for c in clients:  # connect the broker before the clock starts
            c.celery.connection_for_write().ensure_connection()
        processes = [p for w in workers for p in w.processes()]
        commands0 = self.redis_commands()
        load0 = os.getloadavg()[0]
        profilers = []
        if self.profile:
            from bench.profile import Profiler

            stamp = dt.datetime.now(dt.UTC).strftime("%H%M%S")
            profilers = [Profiler(w.process.pid, RESULTS / f"profile-{stamp}-{label}-{i}.txt")
                         for i, w in enumerate(workers) if w.process is not None]
        machine0 = psutil.cpu_times()
        me = psutil.Process()
        me0 = sum(me.cpu_times()[:2])
        with Sampler(processes) as sampler, ThreadPoolExecutor(submitters) as pool:
            t0 = time.time()
            list(pool.map(lambda i: clients[i % submitters].submit(images=images, prompt=prompt, task_id=ids[i]),
                          range(n)))
            submitted = time.time()
            trace = sub.result()
        machine1 = psutil.cpu_times()
        producer_cpu = sum(me.cpu_times()[:2]) - me0
        busy = sum(machine1) - machine1.idle - (sum(machine0) - machine0.idle)
        for profiler in profilers:
            profiler.stop()
        commands = self.redis_commands() - commands0
        for c in clients:
            c.close()
        out = summarize(trace, settings.coalesce_ms, settings.coalesce_chars, token_interval_ms)
        finished = [t.finished_at for t in trace.tasks.values() if t.finished_at]
        out.update(sampler.summary())
        out["machine_cpu_pct"] = round(100 * busy / sampler.wall_s, 1)  # of one core; 200 = both cores busy
        out["producer_cpu_s"] = round(producer_cpu, 2)
        out["submit_s"] = round(submitted - t0, 3)
        out["end_to_end_s"] = round(max(finished) - t0, 3) if finished else None
        out["tasks_per_s"] = round(len(finished) / (max(finished) - t0), 1) if finished else None
        out["redis_commands_per_task"] = round(commands / n, 1)
        out["pool_errors"] = pool_errors([w.log() for w in workers])
        out["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # before, after: other load on the box
        out["profiles"] = [str(p.out) for p in profilers]
        return out

    def record(self, section: str, label: str, **row: Any) -> dict[str, Any]:
        row = {"section": section, "label": label, **row}
        self.rows.append(row)
        row.setdefault("loadavg_1m", round(os.getloadavg()[0], 2))
        print(one_line(row), flush=True)
        if self.partial is not None:  # kept after every row, so an interrupted run keeps what it measured
            self.partial.write_text(json.dumps({"rows": self.rows}, indent=2, default=str))
        return row

    # -- sections ---------------------------------------------------------------------------------
    def stream_emulator(self) -> Emulator:
        tokens = 150 if self.quick else 500
        return Emulator(tps=50, first_token_s=1.0, reasoning_tokens=tokens - tokens // 5, answer_tokens=tokens // 5)

    def fanout(self) -> None:
        sizes = self.sizes or ([1, 50, 500] if self.quick else [1, 50, 200, 500])
        with self.stream_emulator() as emulator:
            for n in sizes:
                for coalesce in self.coalesce:
                    env = self.env(emulator, QVQ_COALESCE_MS=coalesce)
                    with Worker(env, concurrency=max(200, n), name=f"fanout{n}") as worker:
                        time.sleep(1.0)
                        row = self.batch(env, [worker], n, [SAMPLE.as_uri()], "Describe the picture.", 300,
                                         label=f"fanout{n}-c{coalesce}", token_interval_ms=1000 / emulator.tps)
                    self.record("fanout", f"threads c={max(200, n)} coalesce={coalesce}ms", n=n, pool="threads",
                                coalesce_ms=int(coalesce), **row)

    def direct(self) -> None:
        sizes = self.sizes or ([1, 50, 500] if self.quick else [1, 50, 200, 500])
        with self.stream_emulator() as emulator:
            for lean in (False, True):
                for n in sizes:
                    label = "worker.sse reader, no queue" if lean else "openai SDK, no queue"
                    args = [sys.executable, "-m", "bench.direct", "--url", emulator.url, "--n", str(n)]
                    limit = min(240, 60 + n)  # the SDK at 500 threads can thrash on the GIL for many minutes
                    try:
                        out = subprocess.run(args + (["--lean"] if lean else []), cwd=REPO, capture_output=True,
                                             text=True, timeout=limit, env={**os.environ, "PYTHONPATH": str(REPO)})
                    except subprocess.TimeoutExpired:
                        self.record("direct", f"{label} (gave up after {limit} s)", n=n, gave_up_after_s=limit,
                                    delay_ms=EMPTY, completed=0)
                        continue
                    if out.returncode != 0:
                        raise RuntimeError(out.stderr[-3000:])
                    row = json.loads(out.stdout.strip().splitlines()[-1])
                    self.record("direct", label, **row)

    def idle(self) -> None:
        """Memory of streams waiting for their first token: RSS with N streams open - RSS idle."""
        n = 500
        with Emulator(tps=50, first_token_s=1.0, reasoning_tokens=5, answer_tokens=5) as emulator:
            env = self.env(emulator)
            with Worker(env, concurrency=n, name="idle") as worker:
                time.sleep(1.0)
                self.redis.flushdb()
                from contracts.settings import Settings
                from producer.client import Client

                client = Client(Settings.from_env(env))
                procs = worker.processes()
                sampler = Sampler(procs)
                base = sampler.rss()
                prompt = "[[emulator: first_token_s=20]] Wait."
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda _: client.submit(images=[SAMPLE.as_uri()], prompt=prompt), range(n)))
                deadline = time.monotonic() + 60
                while emulator.stats()["streams_active"] < n and time.monotonic() < deadline:
                    time.sleep(0.2)
                active = emulator.stats()["streams_active"]
                time.sleep(1.0)
                loaded = sampler.rss()
                threads = sum(p.num_threads() for p in procs)
                client.close()
            self.record("idle", f"{n} streams waiting for the first token", n=n, streams_open=active,
                        rss_idle_mb=round(base / 2**20, 1), rss_loaded_mb=round(loaded / 2**20, 1),
                        kb_per_stream=round((loaded - base) / max(1, active) / 1024, 1), threads=threads,
                        pool_errors=pool_errors([worker.log()]))

    def prefork(self) -> None:
        n = 6
        cores = os.cpu_count() or 1
        with self.stream_emulator() as emulator:
            env = self.env(emulator)
            with Worker(env, pool="prefork", concurrency=cores, name="prefork") as worker:
                time.sleep(2.0)
                row = self.batch(env, [worker], n, [SAMPLE.as_uri()], "Describe the picture.", 300,
                                 token_interval_ms=1000 / emulator.tps)
            self.record("fanout", f"prefork c={cores} (Celery default)", n=n, pool="prefork", coalesce_ms=50, **row)

    def short(self) -> None:
        from tests.s3server import S3Server

        if self.s3 is None:
            self.s3 = S3Server().start()
            self.s3.create_bucket("bench")
            self.s3.put("bench", "img.png", image_100kb(), "image/png")
        m = 200 if self.quick else 600
        cores = os.cpu_count() or 1
        cases: list[tuple[str, int, int]] = [("threads", 1, 200), ("threads", 2, 200), ("threads", 4, 200),
                                             ("prefork", 1, cores)]
        with Emulator(tps=0, first_token_s=0, reasoning_tokens=80, answer_tokens=20) as emulator:
            for pool, count, conc in cases:
                env = self.env(emulator)
                workers = [Worker(env, pool=pool, concurrency=conc, name=f"short{i}") for i in range(count)]
                with ThreadPoolExecutor(count) as starter:
                    list(starter.map(Worker.start, workers))
                try:
                    time.sleep(1.5)
                    row = self.batch(env, workers, m, ["s3://bench/img.png"], "What is it?", 300,
                                     label=f"short-{pool}{count}")
                finally:
                    for w in workers:
                        w.stop()
                self.record("short", f"{count} x {pool} c={conc}", n=m, pool=pool, processes=count, **row)


def image_100kb() -> bytes:
    from PIL import Image

    rnd = random.Random(5)
    side = 186  # noise barely compresses: 186 x 186 x 3 bytes is about 100 KB as PNG
    im = Image.frombytes("RGB", (side, side), bytes(rnd.getrandbits(8) for _ in range(side * side * 3)))
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


POOL_ERROR_MARKERS = ("Too many connections", "PoolTimeout", "QueuePool limit", "TimeoutError",
                      "ConnectionError", "Traceback", "task.crashed", "task.failed")


def pool_errors(logs: list[str]) -> dict[str, int]:
    found: dict[str, int] = {}
    for text in logs:
        for marker in POOL_ERROR_MARKERS:
            if count := text.count(marker):
                found[marker] = found.get(marker, 0) + count
    return found


def machine() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    redis_version = ""
    with __import__("contextlib").suppress(Exception):
        redis_version = redis.Redis.from_url(BENCH_REDIS_URL).info()["redis_version"] if BENCH_REDIS_URL else ""
    return {"nproc": os.cpu_count(), "cpu": cpu, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "redis": redis_version,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds")}


BENCH_REDIS_URL = ""


def one_line(row: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in row.items() if k not in ("workers",)}, default=str)


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def table(rows: list[dict[str, Any]]) -> str:
    lines = []
    streams = [r for r in rows if r["section"] in ("fanout", "direct")]
    if streams:
        lines.append("| case | N | token delay p50 / p99 / max ms | delta delay (last token) p50 / p99 ms | "
                     "added delay p50 / p99 / max ms | "
                     "tok/s per stream generated -> delivered | CPU % (100 = 1 core) | peak RSS MB | "
                     "events/task | Redis cmds/task | peak concurrent | completed |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in streams:
            d, dd, a = r["delay_ms"], r.get("delta_delay_ms") or r["delay_ms"], r.get("added_delay_ms") or {}
            gen, dlv = r.get("stream_tps_generated"), r.get("stream_tps_delivered")
            ratio = f" ({100 * dlv / gen:.1f}%)" if gen and dlv else ""
            done = f"{r.get('completed', r['n'] - r.get('error_count', 0))}/{r['n']}"
            lines.append(f"| {r['section']}: {r['label']} | {r['n']} | {fmt(d['p50'], 2)} / {fmt(d['p99'], 1)} / "
                         f"{fmt(d['max'], 0)} | {fmt(dd['p50'], 2)} / {fmt(dd['p99'], 1)} | "
                         f"{fmt(a.get('p50'), 2)} / {fmt(a.get('p99'), 1)} / {fmt(a.get('max'), 0)} | "
                         f"{fmt(gen, 2)} -> {fmt(dlv, 2)}{ratio} | {fmt(r.get('cpu_pct'))} | "
                         f"{fmt(r.get('peak_rss_mb'))} | {fmt(r.get('events_per_task'))} | "
                         f"{fmt(r.get('redis_commands_per_task'))} | {fmt(r.get('peak_concurrent'))} | {done} |")
    short = [r for r in rows if r["section"] == "short"]
    if short:
        lines.append("")
        lines.append("| short tasks | tasks | tasks/s end to end | submit s | total s | workers' CPU % | "
                     "machine CPU % (200 = 2 cores) | worker CPU ms/task | completed |")
        lines.append("|---|---|---|---|---|---|---|---|---|")
        for r in short:
            per_task = 1000 * r["cpu_s"] / r["n"]
            lines.append(f"| {r['label']} | {r['n']} | {fmt(r['tasks_per_s'])} | {fmt(r['submit_s'], 2)} | "
                         f"{fmt(r['end_to_end_s'], 2)} | {fmt(r['cpu_pct'])} | {fmt(r.get('machine_cpu_pct'))} | "
                         f"{per_task:.1f} | {r['completed']}/{r['n']} |")
    idle = [r for r in rows if r["section"] == "idle"]
    for r in idle:
        lines.append("")
        lines.append(f"idle streams: {r['streams_open']} open, worker RSS {r['rss_idle_mb']} MB -> "
                     f"{r['rss_loaded_mb']} MB ({r['kb_per_stream']} KB per stream, {r['threads']} threads)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    global BENCH_REDIS_URL
    parser = argparse.ArgumentParser(prog="python -m bench", description="qvq-queue benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a few minutes)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated of {', '.join(SECTIONS)}")
    parser.add_argument("--profile", action="store_true", help="py-spy each worker during each batch")
    parser.add_argument("--sizes", default="", help="fan-out sizes, e.g. 50,200 (default 1,50,200,500)")
    parser.add_argument("--coalesce", default="", help="QVQ_COALESCE_MS values for fan-out (default 50,0)")
    parser.add_argument("--out", default="", help="JSON file (default bench/results/<time>.json)")
    args = parser.parse_args(argv)
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(chosen) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    started = time.time()
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = Path(args.out) if args.out else RESULTS / f"{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    with Bench(args.quick, args.profile) as bench:
        bench.partial = path.with_suffix(".partial.json")
        if args.coalesce:
            bench.coalesce = args.coalesce.split(",")
        if args.sizes:
            bench.sizes = [int(x) for x in args.sizes.split(",")]
        BENCH_REDIS_URL = bench.redis_url
        info = machine()
        print(f"# {info}", flush=True)
        sections: dict[str, Callable[[], None]] = {s: getattr(bench, s) for s in SECTIONS}
        for name in chosen:
            sections[name]()
        rows = bench.rows
    report = {"machine": info, "quick": args.quick, "duration_s": round(time.time() - started, 1), "rows": rows}
    path.write_text(json.dumps(report, indent=2, default=str))
    print()
    print(table(rows))
    bench.partial.unlink(missing_ok=True)
    print(f"\nwritten: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
