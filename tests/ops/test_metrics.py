"""The worker's metrics endpoint and the API's /metrics after tasks complete, fail, retry and are cancelled:
every metric of design.md present, with the values the tasks' records and events say."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from structlog.testing import capture_logs

from contracts import events as ev
from contracts.metrics import API_METRIC_NAMES, QUEUE_DEPTH_NAME, WORKER_METRIC_NAMES
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
    for name in WORKER_METRIC_NAMES:
        assert page.has(name), name
    assert not any(page.has(name) for name in API_METRIC_NAMES)  # only the worker's own families
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
    assert page.value("qvq_task_failures_total", code="model.rejected") == 1
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
        submitted_at = time.time()
        for _ in range(3):  # no worker runs: they wait in the queue
            client.submit(images=[str(image)], prompt="What colour?")
        page = _scrape_until(f"{api.url}/metrics", lambda p: p.value("qvq_queue_oldest_age_seconds", queue="qvq") > 0)
        waited = time.time() - submitted_at
    for name in API_METRIC_NAMES:
        assert page.has(name), name
    assert not any(page.has(name) for name in WORKER_METRIC_NAMES)  # only the API's own families
    assert empty.value(QUEUE_DEPTH_NAME, queue="qvq") == 0
    assert page.value(QUEUE_DEPTH_NAME, queue="qvq") == 3
    assert page.value(QUEUE_DEPTH_NAME, queue="qvq-callbacks") == 0  # every queue, the callbacks' too
    assert empty.value("qvq_queue_oldest_age_seconds", queue="qvq") == 0
    assert 0 < page.value("qvq_queue_oldest_age_seconds", queue="qvq") <= waited  # the first of the three


def test_api_requests_are_counted_by_route_template_and_carry_a_request_id(service_env: dict[str, str],
                                                                           make_client: Any, tmp_path: Path) -> None:
    image = tmp_path / "red.png"
    image.write_bytes(make_image("PNG", size=(64, 48), color=(220, 20, 20)))
    route = {"route": "/v1/tasks/{task_id}", "method": "GET"}
    settings = Settings.from_env({**service_env, "QVQ_UPLOAD_URL": str(tmp_path / "uploads")})
    with ApiServer(settings) as api:
        before = _scrape(f"{api.url}/metrics")
        upload = httpx.post(f"{api.url}/v1/uploads", files={"file": ("red.png", image.read_bytes(), "image/png")})
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            created = httpx.post(f"{api.url}/v1/tasks", json={"images": [upload.json()["ref"]], "prompt": "Colour?"},
                                 headers={"X-Request-ID": "req-42.a:b"}, timeout=10)
        assert created.status_code == 202, created.text
        assert created.headers["x-request-id"] == "req-42.a:b"
        missing = [httpx.get(f"{api.url}/v1/tasks/nope-{n}", headers={"X-Request-ID": "<b>\xe9".encode("latin-1")}, timeout=10)
                   for n in range(3)]
        unmatched = httpx.get(f"{api.url}/no/such/path", timeout=10)
        page = _scrape(f"{api.url}/metrics")
    assert [r.status_code for r in missing] == [404] * 3
    generated = {r.headers["x-request-id"] for r in missing}
    assert len(generated) == 3 and all(len(g) == 32 and int(g, 16) >= 0 for g in generated)  # unsafe ids replaced
    assert page.value("qvq_http_requests_total", **route, status="404") - \
        before.value("qvq_http_requests_total", **route, status="404") == 3
    assert page.value("qvq_http_request_duration_seconds_count", route="/v1/tasks/{task_id}") - \
        before.value("qvq_http_request_duration_seconds_count", route="/v1/tasks/{task_id}") == 3
    assert unmatched.status_code == 404
    assert page.value("qvq_http_requests_total", route="unmatched", method="GET", status="404") >= 1
    assert page.value("qvq_http_requests_in_flight") == 1  # the scrape itself
    assert not any("nope-" in str(labels) for _, labels in page.samples), "a path in a label"
    submitted = [entry for entry in logs if entry["event"] == "task.submitted"]
    assert len(submitted) == 1 and submitted[0]["request_id"] == "req-42.a:b", logs
    assert submitted[0]["task_id"] == created.json()["task_id"]


def test_the_api_metrics_move_to_their_own_port_when_one_is_set(service_env: dict[str, str]) -> None:
    port = free_port()
    with ApiServer(Settings.from_env({**service_env, "QVQ_API_METRICS_PORT": str(port)})) as api:
        assert httpx.get(f"{api.url}/livez", timeout=10).status_code == 200
        assert httpx.get(f"{api.url}/metrics", timeout=10).status_code == 404  # not on the API's own port
        page = _scrape(f"http://127.0.0.1:{port}/metrics")
    assert page.value("qvq_http_requests_total", route="/livez", method="GET", status="200") >= 1
    assert page.has(QUEUE_DEPTH_NAME)
    with pytest.raises(httpx.TransportError):  # stopped with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
