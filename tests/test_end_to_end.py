"""The whole pipeline on real services: producer -> Redis broker -> Celery worker process -> S3 and
local images -> emulator over HTTP -> Redis events -> SQL store."""

from __future__ import annotations

import json
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from contracts import events as ev
from contracts.catalog import MODELS
from contracts.errors import RequestError
from contracts.webhook import SIGNATURE_HEADER, verify
from tests.imagegen import make_image
from tests.worker.test_callback import Receiver

pytestmark = pytest.mark.timeout(120)


def _collect(handle: Any, timeout: float = 60) -> list[dict[str, Any]]:
    return list(handle.events(timeout=timeout))


def _expected_cost(model: str, usage: dict[str, Any]) -> float:
    info = MODELS[model]
    return float(
        (Decimal(usage["prompt_tokens"]) * info.input_price / 1000).quantize(Decimal("0.000001"))
        + (Decimal(usage["completion_tokens"]) * info.output_price / 1000).quantize(Decimal("0.000001"))
    )


def test_two_images_stream_and_persist_on_each_store(
    database_url: str, start_worker: Any, make_client: Any, s3: Any, tmp_path: Path
) -> None:
    s3.create_bucket("photos")
    s3.put("photos", "red.jpg", make_image("JPEG", size=(320, 200), color=(220, 20, 20)))
    local = tmp_path / "blue.png"
    local.write_bytes(make_image("PNG", size=(64, 48), color=(20, 20, 220)))
    start_worker(DATABASE_URL=database_url)
    client = make_client(DATABASE_URL=database_url)

    handle = client.submit(images=["s3://photos/red.jpg", str(local)], prompt="Which colours do you see?",
                           model="qvq-plus", tenant="acme", metadata={"order": 7})
    events = _collect(handle)

    types = [e["type"] for e in events]
    assert types[:3] == [ev.QUEUED, ev.STARTED, ev.IMAGES_READY]
    assert types[-1] == ev.COMPLETED
    assert set(types[3:-1]) == {ev.REASONING_DELTA, ev.ANSWER_DELTA}
    assert types.index(ev.ANSWER_DELTA) > max(i for i, t in enumerate(types) if t == ev.REASONING_DELTA)
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1))
    assert all(e["task_id"] == handle.task_id for e in events)

    record = handle.result(timeout=30)
    assert record.status == "completed"
    reasoning = "".join(e["text"] for e in events if e["type"] == ev.REASONING_DELTA)
    answer = "".join(e["text"] for e in events if e["type"] == ev.ANSWER_DELTA)
    assert reasoning == record.reasoning and answer == record.answer
    assert "320x200" in reasoning and "red" in reasoning and "64x48" in reasoning and "blue" in reasoning

    completed = events[-1]
    assert completed["usage"] == record.usage
    assert completed["usage"]["prompt_tokens_details"]["image_tokens"] == events[2]["image_tokens"]
    assert float(completed["cost"]["total"]) == pytest.approx(_expected_cost("qvq-plus", record.usage), abs=1e-9)
    assert completed["cost"]["total"] == f"{record.cost['total']:.6f}"  # exact text; Decimal in Python
    assert completed["cost"]["currency"] == "CNY"
    assert completed["metadata"] == {"order": 7}
    assert set(completed["timings"]) == {"queue_s", "first_reasoning_s", "first_answer_s", "total_s"}

    images = events[2]["images"]
    assert [i["ref"] for i in images] == ["s3://photos/red.jpg", f"file://{local}"]
    assert images[0]["format"] == "JPEG" and images[1]["format"] == "PNG"
    bills = client.store.usage_rows(handle.task_id)
    assert len(bills) == 1 and bills[0]["tenant"] == "acme"
    assert bills[0]["prompt_tokens"] == record.usage["prompt_tokens"]


def test_missing_object_fails_with_not_found(start_worker: Any, make_client: Any, s3: Any) -> None:
    s3.create_bucket("photos")
    start_worker()
    client = make_client()
    handle = client.submit(images=["s3://photos/nope.png"], prompt="What is this?")
    events = _collect(handle)
    assert events[-1]["type"] == ev.FAILED
    assert events[-1]["error"]["code"] == "image.not_found"
    assert "s3://photos/nope.png" in events[-1]["error"]["message"]
    assert handle.result(timeout=10).status == "failed"


def test_non_image_object_is_unsupported_format(start_worker: Any, make_client: Any, s3: Any) -> None:
    s3.create_bucket("docs")
    s3.put("docs", "notes.png", b"just some text, not a picture\n" * 10)
    start_worker()
    client = make_client()
    handle = client.submit(images=["s3://docs/notes.png"], prompt="What is this?")
    terminal = _collect(handle)[-1]
    assert terminal["type"] == ev.FAILED and terminal["error"]["code"] == "image.unsupported_format"
    assert client.store.list_tasks(status="running") == []


def test_unknown_model_is_refused_at_submit(make_client: Any, tmp_path: Path) -> None:
    client = make_client()
    with pytest.raises(RequestError) as caught:
        client.submit(images=[str(tmp_path / "x.png")], prompt="hi", model="qvq-ultra")
    assert caught.value.code == "model.unknown" and "qvq-ultra" in str(caught.value)
    with pytest.raises(RequestError, match="vision"):
        client.submit(images=[str(tmp_path / "x.png")], prompt="hi", model="qvq-72b-preview")
    assert client.store.list_tasks() == []


def test_idempotency_key_returns_the_first_task(make_client: Any, start_worker: Any, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG"))
    start_worker()
    client = make_client()
    first = client.submit(images=[str(image)], prompt="hello", idempotency_key="order-1")
    second = client.submit(images=[str(image)], prompt="hello", idempotency_key="order-1")
    assert second.task_id == first.task_id and first.created and not second.created
    assert first.result(timeout=30).status == "completed"
    assert len(client.store.list_tasks()) == 1


def test_the_terminal_event_is_posted_signed_to_the_callback_url(
    start_worker: Any, make_client: Any, tmp_path: Path
) -> None:

    receiver = Receiver([])
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        image = tmp_path / "a.png"
        image.write_bytes(make_image("PNG"))
        start_worker(QVQ_WEBHOOK_SECRET="hook-secret")
        client = make_client()
        url = f"http://127.0.0.1:{receiver.server_address[1]}/done"
        handle = client.submit(images=[str(image)], prompt="hello", callback_url=url)
        terminal = _collect(handle)[-1]
        deadline = time.monotonic() + 10
        while not receiver.received and time.monotonic() < deadline:
            time.sleep(0.05)
        headers, body = receiver.received[0]
        assert verify(body, headers[SIGNATURE_HEADER], "hook-secret")
        posted = json.loads(body)
        assert posted["type"] == "task.completed" and posted["seq"] == terminal["seq"]
        assert posted["answer"] == terminal["answer"]
    finally:
        receiver.shutdown()
        receiver.server_close()


def test_presigned_delivery_sends_a_store_url_instead_of_the_bytes(
    start_worker: Any, make_client: Any, s3: Any
) -> None:
    s3.create_bucket("photos")
    s3.put("photos", "green.png", make_image("PNG", size=(64, 48), color=(20, 200, 20)))
    start_worker(QVQ_IMAGE_DELIVERY="presigned")
    client = make_client()
    handle = client.submit(images=["s3://photos/green.png"], prompt="What is this?")
    events = _collect(handle)
    assert events[-1]["type"] == ev.COMPLETED
    # The emulator never downloads URLs: it describes them as remote images.
    assert "remote image" in events[-1]["reasoning"]
