"""The result cache on real services: a rerun of the same image bytes and question (under another name)
completes from the cache with no model call and a bill of 0; another tenant's identical job is not served
from it; identical jobs at once make one model call between them (single flight)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from decimal import Decimal
from typing import Any

import pytest

from contracts import events as ev
from tests.imagegen import make_image

pytestmark = pytest.mark.timeout(120)


def _bucket(s3: Any) -> str:
    bucket = f"cache-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(bucket)
    data = make_image("PNG", size=(120, 90), color=(20, 180, 20))
    s3.put(bucket, "a.png", data)
    s3.put(bucket, "copy-of-a.png", data)  # the same bytes under another name
    return bucket


def test_a_cached_rerun_makes_no_model_call_and_bills_nothing(
        start_worker: Any, make_client: Any, s3: Any, emulator: Any) -> None:
    bucket = _bucket(s3)
    start_worker()
    client = make_client()
    question = f"What is in it? {uuid.uuid4()}"
    first = client.submit(images=[f"s3://{bucket}/a.png"], prompt=question, model="qvq-plus", tenant="acme",
                          cache=True).result(timeout=60)
    assert first.status == "completed" and first.cached_from is None and Decimal(first.cost["total"]) > 0
    calls = emulator.stats["requests"]

    handle = client.submit(images=[f"s3://{bucket}/copy-of-a.png"], prompt=question, model="qvq-plus",
                           tenant="acme", cache=True)
    again = handle.result(timeout=60)
    assert emulator.stats["requests"] == calls  # no model call
    assert again.status == "completed" and again.cached_from == first.id and again.to_dict()["cached"] is True
    assert again.answer == first.answer and again.reasoning == first.reasoning
    assert Decimal(again.cost["total"]) == 0 and again.usage["billed"]["total_tokens"] == 0
    assert [(row["outcome"], row["total_cost"]) for row in client.store.usage_rows(again.id)] == [("cached", 0)]
    final = list(handle.events(timeout=30))[-1]
    assert final["type"] == ev.COMPLETED and final["cached"] is True and final["cached_from"] == first.id

    other = client.submit(images=[f"s3://{bucket}/a.png"], prompt=question, model="qvq-plus", tenant="globex",
                          cache=True).result(timeout=60)
    assert other.cached_from is None and emulator.stats["requests"] == calls + 1  # another tenant pays its own

    uncached = client.submit(images=[f"s3://{bucket}/a.png"], prompt=question, model="qvq-plus",
                             tenant="acme").result(timeout=60)
    assert uncached.cached_from is None and emulator.stats["requests"] == calls + 2  # not asked for: a call


def test_identical_jobs_at_once_make_one_model_call(
        start_worker: Any, make_client: Any, s3: Any, emulator: Any) -> None:
    bucket = _bucket(s3)
    start_worker()
    client = make_client()
    question = f"Describe it slowly. {uuid.uuid4()} [[emulator: tps=40 reasoning_tokens=40 answer_tokens=10]]"
    calls = emulator.stats["requests"]
    with ThreadPoolExecutor(5) as pool:
        handles = list(pool.map(lambda _: client.submit(images=[f"s3://{bucket}/a.png"], prompt=question,
                                                        model="qvq-plus", cache=True), range(5)))
    records = [handle.result(timeout=60) for handle in handles]
    assert emulator.stats["requests"] == calls + 1
    paid = [record for record in records if record.cached_from is None]
    assert len(paid) == 1 and all(record.status == "completed" for record in records)
    assert {record.cached_from for record in records if record is not paid[0]} == {paid[0].id}
    assert {record.answer for record in records} == {paid[0].answer}
    waited = [event for handle in handles for event in handle.events(timeout=30) if event["type"] == ev.WAITING]
    assert waited and {event["reason"] for event in waited} == {ev.IDENTICAL_JOB}
