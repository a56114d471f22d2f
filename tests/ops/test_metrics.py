"""The worker's metrics endpoint and the API's /metrics after tasks complete, fail, retry and are cancelled:
every metric of design.md present, with the values the tasks' records and events say."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts import events as ev
from contracts.metrics import METRIC_NAMES, QUEUE_DEPTH_NAME
from contracts.settings import Settings
from tests.imagegen import make_image
from tests.ops import Scrape, free_port
from tests.producer import ApiServer
from tests.reliability import directive
from tests.waiting import wait_until

pytestmark = pytest.mark.timeout(120)


def _scrape(url: str) -> Scrape:
    response = httpx.get(url, timeout=5)
    response.raise_for_status()
    assert response.headers["content-type"].startswith("text/plain")
    return Scrape(response.text)


def _scrape_until(url: str, done: Any, timeout: float = 15) -> Scrape:
    deadline = time.monotonic() + timeout
    while True:
        page = _scrape(url)
        if done(page) or time.monotonic() > deadline:
            return page
        time.sleep(0.05)


def _wait_for(handle: Any, type_: str, timeout: float = 30) -> None:
    wait_until(lambda: any(e["type"] == type_ for e in handle.client.bus.read_log(handle.task_id)), timeout,
               f"no {type_} for {handle.task_id}")


def test_worker_metrics_count_completed_failed_retried_and_cancelled_tasks(
        start_worker: Any, make_client: Any, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(make_image("PNG", size=(64, 48), color=(220, 20, 20)))
    port = free_port()
    start_worker(QVQ_METRICS_PORT=str(port))
    client = make_client()
    url = f"http://127.0.0.1:{port}/metrics"

    ok = client.submit(images=[str(image)], prompt="What colour?", model="qvq-plus")
    retried = client.submit(images=[str(image)], prompt=f"Again? {directive(fault='500@1')}", model="qvq-plus")
    failed = client.submit(images=[str(image)], prompt=f"No. {directive(fault='400@1')}", model="qvq-max")
    slow = client.submit(images=[str(image)], prompt=f"Slowly {directive(tps=5)}", model="qvq-plus")
    _wait_for(slow, ev.REASONING_DELTA)
    assert _scrape(url).value("qvq_active_streams") >= 1
    assert slow.cancel()
    records = {h.task_id: h.result(timeout=60) for h in (ok, retried, failed, slow)}
    assert [records[h.task_id].status for h in (ok, retried, failed, slow)] == [
        "completed", "completed", "failed", "cancelled"]

    page = _scrape_until(url, lambda p: p.value("qvq_events_published_total", type="task.cancelled") == 1
                         and p.value("qvq_active_streams") == 0)
    for name in METRIC_NAMES - {QUEUE_DEPTH_NAME}:
        assert page.has(name), name
    assert page.value("qvq_tasks_total", status="completed", model="qvq-plus") == 2
    assert page.value("qvq_tasks_total", status="failed", model="qvq-max") == 1
    assert page.value("qvq_tasks_total", status="cancelled", model="qvq-plus") == 1
    assert page.value("qvq_task_duration_seconds_count", status="completed") == 2
    assert page.value("qvq_task_duration_seconds_count", status="cancelled") == 1
    assert page.value("qvq_first_token_seconds_count", kind="reasoning") == 2
    assert page.value("qvq_first_token_seconds_count", kind="answer") == 2
    assert page.value("qvq_model_attempts_total", code="ok") == 2
    assert page.value("qvq_model_attempts_total", code="model.unavailable") == 1
    assert page.value("qvq_model_attempts_total", code="model.rejected") == 1
    assert page.value("qvq_active_streams") == 0
    assert page.value("qvq_events_published_total", type="task.completed") == 2
    assert page.value("qvq_events_published_total", type="task.retrying") == 1
    assert page.value("qvq_events_published_total", type="task.failed") == 1

    completed = [records[ok.task_id], records[retried.task_id]]
    for kind in ("prompt", "completion"):
        billed = sum(r.usage[f"{kind}_tokens"] for r in completed)
        assert billed > 0
        assert page.value("qvq_tokens_total", model="qvq-plus", kind=kind) == billed
    assert page.value("qvq_cost_cny_total", model="qvq-plus") == pytest.approx(
        float(sum(r.cost["total"] for r in completed)))
    assert not any("task_id" in labels for _, labels in page.samples), "a task id in a label"


def test_api_metrics_report_the_queue_depth_from_the_broker(service_env: dict[str, str], make_client: Any,
                                                             tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(make_image("PNG", size=(64, 48), color=(220, 20, 20)))
    client = make_client()
    with ApiServer(Settings.from_env(service_env)) as api:
        empty = _scrape(f"{api.url}/metrics")
        for _ in range(3):  # no worker runs: they wait in the queue
            client.submit(images=[str(image)], prompt="What colour?")
        page = _scrape(f"{api.url}/metrics")
    for name in METRIC_NAMES:
        assert page.has(name), name
    assert empty.value(QUEUE_DEPTH_NAME, queue="qvq") == 0
    assert page.value(QUEUE_DEPTH_NAME, queue="qvq") == 3
