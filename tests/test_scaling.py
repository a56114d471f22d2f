"""Horizontal scaling: several worker processes share one queue, a killed one loses nothing, and three
workers finish a batch faster than one.

Real `celery worker` processes (the start_worker factory), the emulator over HTTP pacing each stream
with a prompt directive, and a Redis of the module's own (so other test runs on the machine's Redis
cannot take these tasks). Streams are emulator-paced and CPU-light, and each worker runs only 4 at a
time, so the batch time is set by the number of workers, not by this machine's cores.

Bounded by default (< ~60 s); QVQ_SLOW=1 runs bigger batches.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest

from contracts import events as ev
from producer.local.embedded import EmbeddedRedis

SLOW = os.environ.get("QVQ_SLOW") == "1"
CONCURRENCY = 4  # streams per worker process: low on purpose, so workers (not cores) set the pace

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def own_redis() -> Iterator[str]:
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture()
def scaling_env(own_redis: str) -> dict[str, str]:
    import redis

    client = redis.Redis.from_url(own_redis)
    client.flushdb()
    client.close()
    return {
        "REDIS_URL": own_redis,
        # a dead worker's tasks come back after the visibility timeout, which must exceed the task limit
        "QVQ_VISIBILITY_TIMEOUT_S": "8",
        "QVQ_TASK_TIMEOUT_S": "6",
        "QVQ_LEASE_TTL_S": "2",
        "QVQ_STALL_TIMEOUT_S": "3",
        "QVQ_MAX_ATTEMPTS": "6",
    }


def prompt(n: int, seconds: float) -> str:
    tokens = int(seconds * 50)
    return f"[[emulator: tps=50 reasoning_tokens={tokens - 10} answer_tokens=10]] Scaling task {n}."


def image_file(tmp_path: Any) -> str:
    from tests.imagegen import make_image

    path = tmp_path / "scale.png"
    path.write_bytes(make_image("PNG", (64, 48)))
    return path.as_uri()


def submit(client: Any, image: str, count: int, seconds: float) -> list[str]:
    return [client.submit(images=[image], prompt=prompt(n, seconds)).task_id for n in range(count)]


def wait_terminal(client: Any, ids: list[str], timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    records: dict[str, Any] = {}
    while len(records) < len(ids):
        for task_id in ids:
            if task_id not in records and (record := client.get(task_id)).is_terminal:
                records[task_id] = record
        assert time.monotonic() < deadline, f"{len(ids) - len(records)} of {len(ids)} tasks not terminal"
        time.sleep(0.05)
    return records


def starts(client: Any, task_id: str) -> list[dict[str, Any]]:
    return [e for e in client.bus.read_log(task_id) if e["type"] == ev.STARTED]


def run_batch(client: Any, image: str, count: int, seconds: float) -> tuple[float, list[str]]:
    t0 = time.monotonic()
    ids = submit(client, image, count, seconds)
    records = wait_terminal(client, ids, timeout=120)
    elapsed = time.monotonic() - t0
    assert all(r.status == "completed" for r in records.values()), \
        {i: (r.status, r.error_code) for i, r in records.items() if r.status != "completed"}
    return elapsed, ids


def test_three_workers_share_the_queue_and_beat_one(start_worker: Any, make_client: Any,
                                                    scaling_env: dict[str, str], tmp_path: Any) -> None:
    image = image_file(tmp_path)
    count, seconds = (48, 2.0) if SLOW else (16, 1.0)
    client = make_client(**scaling_env)
    first = start_worker(concurrency=CONCURRENCY, name="scale1", **scaling_env)
    one_s, _ = run_batch(client, image, count, seconds)

    workers = [first] + [start_worker(concurrency=CONCURRENCY, name=f"scale{i}", **scaling_env) for i in (2, 3)]
    three_s, ids = run_batch(client, image, count, seconds)

    took_work = {s["worker"] for task_id in ids for s in starts(client, task_id)}
    pids = {w.process.pid for w in workers}
    assert {int(name.rsplit(":", 1)[1]) for name in took_work} == pids, (took_work, pids)
    ratio = one_s / three_s
    print(f"\n{count} tasks of ~{seconds:g} s, {CONCURRENCY} streams per worker: 1 worker {one_s:.2f} s, "
          f"3 workers {three_s:.2f} s, speed-up x{ratio:.2f}")
    assert ratio > 1.3, f"3 workers took {three_s:.2f} s, 1 worker {one_s:.2f} s"


def test_sigkill_one_of_three_workers_mid_batch_loses_nothing(start_worker: Any, make_client: Any,
                                                              scaling_env: dict[str, str], tmp_path: Any) -> None:
    image = image_file(tmp_path)
    count, seconds = (36, 3.0) if SLOW else (12, 2.0)
    client = make_client(**scaling_env)
    workers = [start_worker(concurrency=CONCURRENCY, name=f"kill{i}", **scaling_env) for i in (1, 2, 3)]
    victim = workers[1]
    suffix = f":{victim.process.pid}"
    ids = submit(client, image, count, seconds)

    deadline = time.monotonic() + 30
    while True:  # kill it once it is streaming
        on_victim = [i for i in ids if any(s["worker"].endswith(suffix) for s in starts(client, i))]
        streaming = [i for i in on_victim if any(e["type"] in ev.DELTA_TYPES for e in client.bus.read_log(i))]
        if streaming:
            break
        assert time.monotonic() < deadline, "nothing streamed on the victim worker"
        time.sleep(0.05)
    victim.kill()

    records = wait_terminal(client, ids, timeout=90)
    assert all(r.status == "completed" for r in records.values()), \
        {i: (r.status, r.error_code, r.error_message) for i, r in records.items() if r.status != "completed"}
    for task_id in ids:
        events = client.bus.read_log(task_id)
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        assert len([e for e in events if ev.is_terminal(e)]) == 1
    for task_id in streaming:  # the killed worker's tasks were delivered again and finished elsewhere
        assert records[task_id].attempts > 1
        assert not starts(client, task_id)[-1]["worker"].endswith(suffix)
    survivors = {s["worker"] for i in ids for s in starts(client, i)} - {s["worker"] for i in on_victim
                                                                          for s in starts(client, i)[:1]}
    assert survivors, "the surviving workers ran nothing"
