"""Callbacks as durable deliveries: a real worker POSTs the terminal event to a real receiver on
127.0.0.1, tries again with backoff, stops on 410, and records every try (shown by GET /v1/tasks/{id})."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis
import structlog
from structlog.testing import capture_logs

from contracts import keys
from contracts.settings import Settings
from contracts.store import CallbackRecord, Store
from contracts.webhook import SIGNATURE_HEADER, verify
from tests.imagegen import make_image
from tests.producer import ApiServer
from tests.waiting import wait_until
from tests.worker.test_callback import Receiver, serve
from worker.callbacks import deliveries, scheduler
from worker.callbacks.post import Outcome

pytestmark = pytest.mark.timeout(120)
SECRET = "hook-secret-0123456789abcdef"


@pytest.fixture()
def receivers() -> Iterator[Callable[[list[int]], Receiver]]:
    started: list[Receiver] = []

    def start(statuses: list[int]) -> Receiver:
        started.append(serve(Receiver(list(statuses))))
        return started[-1]

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def final_delivery(store: Store, task_id: str) -> CallbackRecord:
    def done() -> CallbackRecord | None:
        record = store.task_callback(task_id)
        return record if record is not None and record.status != "pending" else None

    return wait_until(done)  # type: ignore[no-any-return]


def test_a_receiver_that_fails_twice_gets_one_accepted_signed_delivery_and_the_tries_are_shown(
        service_env: dict[str, str], start_worker: Any, make_client: Any, receivers: Any, tmp_path: Path) -> None:
    receiver = receivers([500, 503])
    start_worker(QVQ_WEBHOOK_SECRET=SECRET, QVQ_CALLBACK_BACKOFF_S="0.2")
    client = make_client()
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG"))
    url = f"http://127.0.0.1:{receiver.server_address[1]}/hook?token=abc"
    handle = client.submit(images=[str(image)], prompt="hello", callback_url=url)
    assert handle.result(timeout=60).status == "completed"
    delivery = final_delivery(client.store, handle.task_id)
    assert delivery.status == "delivered" and delivery.attempts == 3
    assert [a["status_code"] for a in delivery.attempt_log] == [500, 503, 200]
    assert len(receiver.received) == 3
    ids = {headers["X-Qvq-Event-Id"] for headers, _ in receiver.received}
    headers, body = receiver.received[-1]
    assert verify(body, headers[SIGNATURE_HEADER], SECRET)
    posted = json.loads(body)
    assert ids == {posted["event_id"]} == {delivery.event_id}
    assert posted["event_id"] == f"{handle.task_id}:0:{posted['seq']}" and posted["type"] == "task.completed"

    with ApiServer(Settings.from_env(service_env)) as api:
        shown = httpx.get(f"{api.url}/v1/tasks/{handle.task_id}").json()["callback"]
    assert shown["status"] == "delivered" and shown["attempts"] == 3 and shown["last_status_code"] == 200
    assert shown["url"].endswith("/hook?...") and "token" not in json.dumps(shown)  # the query may hold a secret


def test_a_receiver_that_answers_410_stops_the_delivery(
        start_worker: Any, make_client: Any, receivers: Any, tmp_path: Path) -> None:
    receiver = receivers([410, 200])
    tenant_secret = "acme-hook-secret-0123456789"
    start_worker(QVQ_WEBHOOK_SECRET=SECRET, QVQ_WEBHOOK_SECRETS=f"acme:{tenant_secret}", QVQ_CALLBACK_BACKOFF_S="0.2")
    client = make_client()
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG"))
    handle = client.submit(images=[str(image)], prompt="hello", tenant="acme",
                           callback_url=f"http://127.0.0.1:{receiver.server_address[1]}/gone")
    delivery = final_delivery(client.store, handle.task_id)
    assert delivery.status == "gone" and delivery.attempts == 1 and delivery.next_attempt_at is None
    assert len(receiver.received) == 1 and receiver.statuses == [200]  # never asked again
    headers, body = receiver.received[0]
    assert verify(body, headers[SIGNATURE_HEADER], tenant_secret)  # the tenant's own secret signs its callbacks
    assert not verify(body, headers[SIGNATURE_HEADER], SECRET)


def test_qvq_callbacks_redeliver_sends_it_again(
        service_env: dict[str, str], start_worker: Any, make_client: Any, receivers: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from contracts.settings import reset_settings
    from producer import cli

    receiver = receivers([410])
    start_worker(QVQ_WEBHOOK_SECRET=SECRET, QVQ_CALLBACK_BACKOFF_S="0.2")
    client = make_client()
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG"))
    handle = client.submit(images=[str(image)], prompt="hello",
                           callback_url=f"http://127.0.0.1:{receiver.server_address[1]}/again")
    assert final_delivery(client.store, handle.task_id).status == "gone"
    for name, value in service_env.items():
        monkeypatch.setenv(name, value)
    reset_settings()
    try:
        outcome = CliRunner().invoke(cli.main, ["callbacks", "redeliver", handle.task_id])
        missing = CliRunner().invoke(cli.main, ["callbacks", "redeliver", "no-such-task"])
    finally:
        reset_settings()
    assert outcome.exit_code == 0, outcome.output
    assert missing.exit_code == 2 and missing.output.count("\n") == 1, missing.output
    delivered = wait_until(lambda: (r := client.store.task_callback(handle.task_id)) and r.status == "delivered" and r)
    assert delivered.attempts == 2 and len(receiver.received) == 2


def record(created_ago_s: float, attempts: int = 0) -> CallbackRecord:
    created = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=created_ago_s)
    return CallbackRecord(event_id="t:0:5", task_id="t", run=0, tenant=None, url="http://x", event={},
                          status="pending", attempts=attempts, last_status_code=None, last_error=None,
                          attempt_log=[], next_attempt_at=None, created_at=created, delivered_at=None)


def test_the_next_state_after_each_outcome() -> None:
    settings = Settings(callback_backoff_s=10, callback_backoff_max_s=100, callback_max_age_s=3600)
    assert deliveries.next_state(settings, record(0), Outcome.DELIVERED) == ("delivered", None)
    assert deliveries.next_state(settings, record(0), Outcome.GONE) == ("gone", None)
    assert deliveries.next_state(settings, record(0), Outcome.REFUSED) == ("failed", None)
    status, due = deliveries.next_state(settings, record(0, attempts=3), Outcome.RETRY)
    assert status == "pending" and due is not None
    wait = (due - dt.datetime.now(dt.UTC)).total_seconds()
    assert 63 <= wait <= 80.5  # the 4th try: 10 * 2^3 = 80 s (under the 100 s cap), less up to 20% jitter
    assert deliveries.next_state(settings, record(3590, attempts=1), Outcome.RETRY) == ("failed", None)


def test_the_scheduler_sends_each_due_delivery_once_and_recovers_rows_redis_lost(
        redis_url: str, redis_client: redis.Redis, sqlite_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    monkeypatch.setattr(scheduler, "enqueue", lambda _ctx, event_id: sent.append(event_id))
    store = Store.from_url(sqlite_url)
    ctx: Any = SimpleNamespace(settings=Settings(), store=store, redis=redis_client)
    try:
        assert store.add_callback(event_id="a:0:9", task_id="a", run=0, tenant=None, url="http://x", event={})
        assert not store.add_callback(event_id="a:0:9", task_id="a", run=0, tenant=None, url="http://x", event={})
        first, second = scheduler.DueScheduler(ctx), scheduler.DueScheduler(ctx)
        assert first.tick() + second.tick() == 0  # due, but its wake-up is still on its way (grace)
        redis_client.zadd(keys.CALLBACKS_DUE, {"a:0:9": time.time() - 1, "b:0:1": time.time() + 3600})
        assert first.tick() + second.tick() == 1 and sent == ["a:0:9"]  # one winner; b is not due yet
        redis_client.flushdb()  # Redis lost the wake-ups: the sweep finds the overdue row in the database
        monkeypatch.setattr(scheduler, "SWEEP_GRACE_S", 0.0)
        assert scheduler.DueScheduler(ctx).tick() == 1 and sent == ["a:0:9", "a:0:9"]
        assert store.claim_callback("a:0:9", 60) is not None and store.claim_callback("a:0:9", 60) is None
    finally:
        store.dispose()


def test_a_delivery_survives_its_worker_being_killed_between_tries(
        start_worker: Any, make_client: Any, receivers: Any, tmp_path: Path) -> None:
    receiver = receivers([500] * 1000)
    first = start_worker(name="doomed", QVQ_WEBHOOK_SECRET=SECRET, QVQ_CALLBACK_BACKOFF_S="1")
    client = make_client()
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG"))
    handle = client.submit(images=[str(image)], prompt="hello",
                           callback_url=f"http://127.0.0.1:{receiver.server_address[1]}/later")
    wait_until(lambda: (r := client.store.task_callback(handle.task_id)) and r.attempts >= 1)
    first.kill()  # SIGKILL: nothing in its memory survives
    receiver.statuses.clear()  # the receiver is back
    start_worker(name="heir", QVQ_WEBHOOK_SECRET=SECRET, QVQ_CALLBACK_BACKOFF_S="1")
    delivery = final_delivery(client.store, handle.task_id)
    assert delivery.status == "delivered" and delivery.attempt_log[-1]["status_code"] == 200
    assert len({headers["X-Qvq-Event-Id"] for headers, _ in receiver.received}) == 1


def test_a_refused_callback_urls_secret_is_never_logged_or_stored(
        service_env: dict[str, str], start_worker: Any, make_client: Any, tmp_path: Path) -> None:
    """A receiver's token in the query of a callback URL the guard refuses (loopback, private addresses not
    allowed) reaches neither the worker's log nor the delivery's last_error and attempt_log."""
    worker = start_worker(QVQ_ALLOW_PRIVATE_URLS="0", QVQ_WEBHOOK_SECRET=SECRET)
    client = make_client()
    image = tmp_path / "a.png"
    image.write_bytes(make_image("PNG"))
    token = "tok-0123456789-SECRETVALUE"
    url = f"http://127.0.0.1:9/hook?token={token}&api%5Fkey={token}"
    handle = client.submit(images=[str(image)], prompt="hello", callback_url=url)
    assert handle.result(timeout=60).status == "completed"
    delivery = final_delivery(client.store, handle.task_id)
    assert delivery.status == "failed" and delivery.last_error and "127.0.0.1" in delivery.last_error
    assert token not in json.dumps(delivery.to_dict()) and token not in (delivery.last_error or "")
    wait_until(lambda: "callback.refused" in worker.log())
    assert token not in worker.log()


def test_every_line_of_a_try_names_its_task(receivers: Any) -> None:
    receiver = receivers([500])
    attempts: list[dict[str, Any]] = []
    ctx = SimpleNamespace(
        settings=Settings(allow_private_urls=True, callback_timeout_s=5),
        store=SimpleNamespace(record_callback_attempt=lambda event_id, **fields: attempts.append(fields)),
        redis=SimpleNamespace(zadd=lambda key, mapping: None))
    delivery = dataclasses.replace(record(0), task_id="task-7", event_id="task-7:0:5",
                                   url=f"http://127.0.0.1:{receiver.server_port}/hook", event={"type": "x"})
    with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        status = asyncio.run(deliveries.try_delivery(ctx, delivery, claimed_at=time.monotonic()))  # type: ignore[arg-type]
    assert status == "pending" and len(attempts) == 1
    lines = [entry for entry in logs if entry["event"].startswith("callback.")]
    assert {entry["event"] for entry in lines} == {"callback.failed", "callback.attempt"}
    assert all(entry["task_id"] == "task-7" and entry["event_id"] == "task-7:0:5" for entry in lines), lines
