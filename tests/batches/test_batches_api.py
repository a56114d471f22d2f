"""Batches through the API with a real worker, the emulator and an S3 server: a prefix of 24 images and a
text file filtered by suffix; the dry run (counted, estimated, nothing queued or called); the run with its
progress events to batch.completed; its JSONL and CSV results against each task's answer; the estimate's
range around the real cost; cancel, retry of the failed items, a repeated submit that adds nothing, and
tenant walls on every endpoint."""

from __future__ import annotations

import csv
import io
import json
import uuid
from decimal import Decimal
from typing import Any

import httpx
import pytest

from contracts import events as ev
from contracts.settings import Settings
from tests.imagegen import make_image
from tests.producer import ApiServer, sse_events
from tests.waiting import wait_until
from tests.worker.test_callback import Receiver, serve

pytestmark = pytest.mark.timeout(120)
COLOURS = [(220, 20, 20), (20, 180, 20), (20, 20, 220)]


def _bucket_with_a_shift(s3: Any, images: int = 24) -> tuple[str, str]:
    """A new bucket with `images` PNGs (several sizes) and one text file under one prefix, and another
    image outside it."""
    bucket = f"batch-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    for number in range(images):
        size = (64 + 28 * (number % 5), 48 + 14 * (number % 3))
        s3.put(bucket, f"shift-1/photo-{number:03d}.png", make_image("PNG", size=size, color=COLOURS[number % 3]))
    s3.put(bucket, "shift-1/notes.txt", b"not an image")
    s3.put(bucket, "shift-2/other.png", make_image("PNG"))
    return bucket, f"s3://{bucket}/shift-1/"


def _follow(api: ApiServer, batch_id: str, **headers: str) -> list[dict[str, Any]]:
    with httpx.stream("GET", f"{api.url}/v1/batches/{batch_id}/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [frame["data"] for frame in sse_events(response)]


def test_a_prefix_dry_run_then_the_run_with_progress_results_and_the_estimate(
        service_env: dict[str, str], start_worker: Any, s3: Any, emulator: Any) -> None:
    bucket, source = _bucket_with_a_shift(s3)
    start_worker()
    settings = Settings.from_env(service_env)
    body = {"source": source, "suffix": ".png", "prompt": "Which colour is it?", "model": "qvq-plus"}
    with ApiServer(settings, keepalive_s=0.5) as api:
        calls_before = emulator.stats["requests"]
        dry = httpx.post(f"{api.url}/v1/batches", json={**body, "dry_run": True})
        assert dry.status_code == 200, dry.text
        assert dry.json()["items"] == 24 and dry.json()["estimate"]["unread"] == 0
        assert httpx.get(f"{api.url}/v1/tasks").json()["tasks"] == []
        assert emulator.stats["requests"] == calls_before

        created = httpx.post(f"{api.url}/v1/batches", json=body)
        assert created.status_code == 202, created.text
        batch_id = created.json()["batch_id"]
        assert created.json()["items"] == 24 and created.json()["created"] == 24
        assert created.headers["location"] == f"/v1/batches/{batch_id}"

        events = _follow(api, batch_id)
        types = [event["type"] for event in events]
        assert types[-1] == ev.BATCH_COMPLETED and set(types) <= set(ev.BATCH_EVENT_TYPES), types
        assert [event["seq"] for event in events] == sorted(event["seq"] for event in events)
        done = [event["done"] for event in events]
        assert done == sorted(done) and done[-1] == 24, done
        assert events[-1]["counts"] == {"completed": 24} and events[-1]["status"] == "completed"

        view = httpx.get(f"{api.url}/v1/batches/{batch_id}").json()
        assert view["status"] == "completed" and view["done"] == 24 and view["eta_s"] == 0.0
        results = httpx.get(f"{api.url}/v1/batches/{batch_id}/results")
        assert results.headers["x-qvq-batch-complete"] == "true"
        lines = [json.loads(line) for line in results.text.splitlines()]
        assert [line["ref"] for line in lines] == [f"{source}photo-{n:03d}.png" for n in range(24)]
        for line in lines:
            record = httpx.get(f"{api.url}/v1/tasks/{line['task_id']}").json()
            assert line["status"] == "completed" and line["answer"] == record["answer"] and line["answer"]
            assert line["cost"] == record["cost"]["total"] and record["batch_id"] == batch_id
        spent = sum(Decimal(line["cost"]) for line in lines)
        assert Decimal(view["cost"]) == spent
        estimate = created.json()["estimate"]
        assert Decimal(estimate["cost_cny_min"]) <= spent <= Decimal(estimate["cost_cny_max"]), (estimate, spent)

        table = list(csv.reader(io.StringIO(httpx.get(f"{api.url}/v1/batches/{batch_id}/results",
                                                      params={"format": "csv"}).text)))
        assert table[0][:4] == ["item", "ref", "task_id", "status"] and len(table) == 25
        assert [row[4] for row in table[1:]] == [line["answer"] for line in lines]

        again = httpx.post(f"{api.url}/v1/batches", json={**body, "batch_id": batch_id})
        assert again.status_code == 202 and again.json()["created"] == 0 and again.json()["items"] == 24


ACME, GLOBEX = "acme-key-0123456789abcdef", "globex-key-0123456789abcdef"


def test_cancel_retry_of_the_failed_the_callback_once_and_tenant_walls(
        service_env: dict[str, str], start_worker: Any, s3: Any, emulator: Any) -> None:
    bucket, source = _bucket_with_a_shift(s3, images=12)
    start_worker(concurrency=4)
    settings = Settings.from_env({**service_env, "QVQ_API_KEYS": f"acme:{ACME},globex:{GLOBEX}"})
    acme = {"Authorization": f"Bearer {ACME}"}
    globex = {"Authorization": f"Bearer {GLOBEX}"}
    receiver = serve(Receiver([]))
    missing = [f"s3://{bucket}/later/{n}.png" for n in range(2)]
    body = {"items": [f"{source}photo-000.png", *missing, f"{source}photo-001.png"], "prompt": "Colour?",
            "model": "qvq-plus", "callback_url": f"http://127.0.0.1:{receiver.server_address[1]}/batches"}
    try:
        with ApiServer(settings, keepalive_s=0.5) as api:
            created = httpx.post(f"{api.url}/v1/batches", json=body, headers=acme)
            assert created.status_code == 202, created.text
            batch_id = created.json()["batch_id"]
            # another tenant's key: every endpoint answers as for a missing batch, and changes nothing
            for method, path in (("GET", ""), ("GET", "/results"), ("GET", "/events"), ("POST", "/cancel"),
                                 ("POST", "/retry")):
                answer = httpx.request(method, f"{api.url}/v1/batches/{batch_id}{path}", headers=globex)
                assert answer.status_code == 404 and answer.json()["error"]["code"] == "batch.not_found", path
            unknown = httpx.get(f"{api.url}/v1/batches/b-nothing-here", headers=acme)
            assert unknown.status_code == 404 and unknown.json()["error"]["message"] == (
                answer.json()["error"]["message"].replace(batch_id, "b-nothing-here"))
            taken = httpx.post(f"{api.url}/v1/batches", json={**body, "batch_id": batch_id}, headers=globex)
            assert taken.status_code == 409

            events = _follow(api, batch_id, **acme)
            assert events[-1]["counts"] == {"completed": 2, "failed": 2}
            wait_until(lambda: len(receiver.received) == 1, timeout=30, what="the batch callback")
            lines = [json.loads(line) for line in httpx.get(f"{api.url}/v1/batches/{batch_id}/results",
                                                            headers=acme).text.splitlines()]
            assert [line["status"] for line in lines] == ["completed", "failed", "failed", "completed"]
            assert {line["error"]["code"] for line in lines if line["error"]} == {"image.not_found"}

            for n, ref in enumerate(missing):  # the missing objects arrive; retry the failed items only
                s3.put(bucket, ref.split("/", 3)[3], make_image("PNG", color=COLOURS[n]))
            retried = httpx.post(f"{api.url}/v1/batches/{batch_id}/retry", headers=acme)
            assert retried.status_code == 202 and retried.json()["retried"] == 2
            events = _follow(api, batch_id, **acme)
            assert events[-1]["type"] == ev.BATCH_COMPLETED and events[-1]["counts"] == {"completed": 4}
            assert events[-1]["round"] == 1
            wait_until(lambda: len(receiver.received) == 2, timeout=30, what="the second round's callback")
            posted = [json.loads(body) for _headers, body in receiver.received]
            assert [event["type"] for event in posted] == [ev.BATCH_COMPLETED] * 2
            assert [event["counts"] for event in posted] == [{"completed": 2, "failed": 2}, {"completed": 4}]

            # a slow batch on a worker with 4 threads: some items running, the rest queued, all cancelled
            slow = httpx.post(f"{api.url}/v1/batches", headers=acme, json={
                "source": source, "suffix": ".png", "model": "qvq-plus",
                "prompt": "Slowly. [[emulator: tps=10 reasoning_tokens=300]]"})
            assert slow.status_code == 202 and slow.json()["items"] == 12, slow.text
            slow_id = slow.json()["batch_id"]
            wait_until(lambda: httpx.get(f"{api.url}/v1/batches/{slow_id}", headers=acme).json()["counts"].get(
                "running"), timeout=30, what="an item of the slow batch running")
            cancelled = httpx.post(f"{api.url}/v1/batches/{slow_id}/cancel", headers=acme).json()
            assert cancelled["cancelled"] >= 1 and cancelled["cancelled"] + cancelled["stopping"] == 12, cancelled
            events = _follow(api, slow_id, **acme)
            assert events[-1]["status"] == "cancelled" and events[-1]["counts"] == {"cancelled": 12}
            view = httpx.get(f"{api.url}/v1/batches/{slow_id}", headers=acme).json()
            assert view["status"] == "cancelled" and view["counts"] == {"cancelled": 12}

            refused = httpx.post(f"{api.url}/v1/batches", headers=acme, json={**body, "max_cost_cny": "0.000001"})
            assert refused.status_code == 409 and refused.json()["error"]["code"] == "budget.exceeded"
    finally:
        receiver.shutdown()
