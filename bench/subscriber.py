"""The benchmark's subscriber, in a process of its own: one Redis connection subscribed to every
task's channel (before the tasks are submitted, so nothing needs replaying), stamping each message
on arrival and reading the token send times out of its text (bench.stamp_emulator)."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from dataclasses import dataclass, field
from typing import Any

import redis

from bench.stamp_emulator import stamps

DELTAS = ("reasoning.delta", "answer.delta")
TERMINAL = ("task.completed", "task.failed", "task.cancelled")


@dataclass
class TaskTrace:
    events: int = 0
    deltas: int = 0
    tokens: int = 0
    first_sent: float = 0.0
    last_sent: float = 0.0
    first_recv: float = 0.0
    last_recv: float = 0.0
    started_at: float = 0.0  # task.started received
    finished_at: float = 0.0  # terminal event received
    status: str = ""
    worker: str = ""
    seqs_ok: bool = True
    last_seq: int = 0


@dataclass
class Trace:
    tasks: dict[str, TaskTrace] = field(default_factory=dict)
    delays_ms: list[float] = field(default_factory=list)  # one per token: received - sent
    #: one per delta, in arrival order: (task, type, received, first token's send, last token's send, characters)
    delta_log: list[tuple[str, str, float, float, float, int]] = field(default_factory=list)
    cpu_s: float = 0.0  # the subscriber's own CPU time
    wall_s: float = 0.0
    subscribed_at: float = 0.0
    timed_out: bool = False


def collect(redis_url: str, task_ids: list[str], ready: Any, timeout: float) -> Trace:  # noqa: C901
    client = redis.Redis.from_url(redis_url)
    pubsub = client.pubsub(ignore_subscribe_messages=False)
    channels = {f"qvq:task:{t}".encode(): t for t in task_ids}
    trace = Trace(tasks={t: TaskTrace() for t in task_ids})
    for i in range(0, len(task_ids), 200):
        pubsub.subscribe(*list(channels)[i:i + 200])
    confirmed = 0
    while confirmed < len(task_ids):
        message = pubsub.get_message(timeout=5)
        if message is None:
            raise RuntimeError("subscriptions not confirmed")
        if message["type"] == "subscribe":
            confirmed += 1
    trace.subscribed_at = time.time()
    ready.set()
    open_tasks = len(task_ids)
    cpu0, wall0 = time.process_time(), time.monotonic()
    delta_log = trace.delta_log
    deadline = time.monotonic() + timeout
    delays = trace.delays_ms
    tasks = trace.tasks
    while open_tasks and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=1.0)
        if message is None:
            continue
        now = time.time()
        if message["type"] != "message":
            continue
        event = json.loads(message["data"])
        t = tasks[channels[message["channel"]]]
        t.events += 1
        if event["seq"] != t.last_seq + 1 and t.last_seq:
            t.seqs_ok = False
        t.last_seq = event["seq"]
        kind = event["type"]
        if kind in DELTAS:
            sent = stamps(event["text"])
            t.deltas += 1
            t.tokens += len(sent)
            if sent:
                if not t.first_sent:
                    t.first_sent, t.first_recv = sent[0], now
                t.last_sent, t.last_recv = sent[-1], now
                delays.extend((now - s) * 1000 for s in sent)
                delta_log.append((channels[message["channel"]], kind, now, sent[0], sent[-1], len(event["text"])))
        elif kind == "task.started":
            t.started_at, t.worker = now, event.get("worker", "")
        elif kind in TERMINAL:
            t.finished_at, t.status = now, kind
            open_tasks -= 1
    trace.timed_out = open_tasks > 0
    trace.cpu_s, trace.wall_s = time.process_time() - cpu0, time.monotonic() - wall0
    pubsub.close()
    client.close()
    return trace


def _child(redis_url: str, task_ids: list[str], ready: Any, timeout: float, out: Any) -> None:
    trace = collect(redis_url, task_ids, ready, timeout)
    out.send(trace)
    out.close()


class SubscriberProcess:
    """collect() in a spawned process; `result()` waits for its Trace."""

    def __init__(self, redis_url: str, task_ids: list[str], timeout: float) -> None:
        ctx = mp.get_context("spawn")
        self.ready = ctx.Event()
        self._recv, send = ctx.Pipe(duplex=False)
        self.process = ctx.Process(target=_child, args=(redis_url, task_ids, self.ready, timeout, send),
                                   daemon=True)
        self.timeout = timeout

    def start(self) -> SubscriberProcess:
        self.process.start()
        if not self.ready.wait(30):
            self.process.kill()
            raise RuntimeError("the subscriber did not start")
        return self

    def result(self) -> Trace:
        if not self._recv.poll(self.timeout + 30):
            self.process.kill()
            raise RuntimeError("the subscriber returned nothing")
        trace: Trace = self._recv.recv()
        self.process.join(10)
        return trace


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "max": None, "n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": at(0.50), "p99": at(0.99), "max": round(ordered[-1], 2), "n": len(ordered)}


def peak_concurrency(tasks: list[TaskTrace]) -> int:
    """The most tasks between task.started and their terminal event at one moment."""
    moments = sorted([(t.started_at, 1) for t in tasks if t.started_at and t.finished_at] +
                     [(t.finished_at, -1) for t in tasks if t.started_at and t.finished_at])
    peak = running = 0
    for _, step in moments:
        running += step
        peak = max(peak, running)
    return peak


def added_delays(trace: Trace, window_ms: float, max_chars: int, end_after_ms: float = 0.0) -> list[tuple[float, float]]:
    """(received, added delay ms) per delta: how much later than its coalescing rule allows it arrived.

    A delta is due one window after its first token was sent, or sooner: when its last token was sent if
    it was cut for size (`max_chars`), `end_after_ms` after it if it ends the stream (the end of the
    stream flushes; the emulator paces the closing chunk as one more token), when the next delta's first
    token was sent if that one is of the other kind (the switch flushes). What the subscriber sees beyond
    that was added by the worker, Redis and the wire; with no coalescing it is each token's whole delay."""
    by_task: dict[str, list[tuple[str, float, float, float, int]]] = {}
    for task, kind, received, first, last, chars in trace.delta_log:
        by_task.setdefault(task, []).append((kind, received, first, last, chars))
    out = []
    for deltas in by_task.values():
        for i, (kind, received, first, last, chars) in enumerate(deltas):
            due = first + window_ms / 1000
            if window_ms <= 0 or chars >= max_chars:
                due = min(due, last)
            elif i + 1 == len(deltas):
                due = min(due, last + end_after_ms / 1000)
            elif deltas[i + 1][0] != kind:
                due = min(due, deltas[i + 1][2])
            out.append((received, (received - due) * 1000))
    return out


def by_second(points: list[tuple[float, float]]) -> list[float | None]:
    """The p99 of each second of a run (from its first point), to tell the ramp from the steady state."""
    if not points:
        return []
    start = min(t for t, _ in points)
    buckets: dict[int, list[float]] = {}
    for t, value in points:
        buckets.setdefault(int(t - start), []).append(value)
    return [percentiles(buckets.get(s, []))["p99"] for s in range(max(buckets) + 1)]


def summarize(trace: Trace, coalesce_ms: float = 0.0, coalesce_chars: int = 256,
              end_after_ms: float = 0.0) -> dict[str, Any]:
    tasks = list(trace.tasks.values())
    added = added_delays(trace, coalesce_ms, coalesce_chars, end_after_ms)
    done = [t for t in tasks if t.status == "task.completed"]
    with_tokens = [t for t in tasks if t.tokens > 1 and t.last_sent > t.first_sent and t.last_recv > t.first_recv]
    gen = [(t.tokens - 1) / (t.last_sent - t.first_sent) for t in with_tokens]
    dlv = [(t.tokens - 1) / (t.last_recv - t.first_recv) for t in with_tokens]
    all_sent = [t.first_sent for t in with_tokens] + [t.last_sent for t in with_tokens]
    all_recv = [t.first_recv for t in with_tokens] + [t.last_recv for t in with_tokens]
    total_tokens = sum(t.tokens for t in tasks)
    return {
        "tasks": len(tasks),
        "completed": len(done),
        "statuses": {s: sum(1 for t in tasks if t.status == s) for s in {t.status for t in tasks}},
        "seq_gaps": sum(1 for t in tasks if not t.seqs_ok),
        "tokens": total_tokens,
        "delay_ms": percentiles(trace.delays_ms),
        "delta_delay_ms": percentiles([(received - last) * 1000 for _, _, received, _, last, _ in trace.delta_log]),
        "added_delay_ms": percentiles([a for _, a in added]),
        "added_delay_p99_by_second": by_second(added),
        "subscriber_cpu_pct": round(100 * trace.cpu_s / trace.wall_s, 1) if trace.wall_s else None,
        "events_per_task": round(sum(t.events for t in tasks) / len(tasks), 1) if tasks else 0,
        "deltas_per_task": round(sum(t.deltas for t in tasks) / len(tasks), 1) if tasks else 0,
        "stream_tps_generated": round(sum(gen) / len(gen), 2) if gen else None,
        "stream_tps_delivered": round(sum(dlv) / len(dlv), 2) if dlv else None,
        "fleet_tps_generated": round(total_tokens / (max(all_sent) - min(all_sent)), 1) if all_sent else None,
        "fleet_tps_delivered": round(total_tokens / (max(all_recv) - min(all_recv)), 1) if all_recv else None,
        "peak_concurrent": peak_concurrency(tasks),
        "start_spread_s": round(max(starts) - min(starts), 2) if (starts := [t.started_at for t in tasks
                                                                           if t.started_at]) else None,
        "workers": sorted({t.worker for t in tasks if t.worker}),
        "timed_out": trace.timed_out,
    }
