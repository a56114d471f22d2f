"""The HTTP API over real HTTP (uvicorn on a free port): SSE replay, live, resume with Last-Event-ID and
?from_seq=, keep-alives, 404s, API keys, request validation, and whole runs through a real worker."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contracts import events as ev
from contracts import keys
from contracts.bus import EventBus
from contracts.job import parse_job
from contracts.logging import RedactedArgs
from contracts.settings import Settings
from contracts.store import Store
from tests.imagegen import make_image
from tests.producer import ApiServer, sse_events, sse_frames

pytestmark = pytest.mark.timeout(60)


@pytest.fixture()
def settings(redis_url: str, redis_client: redis.Redis, sqlite_url: str) -> Settings:
    return Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url})


@pytest.fixture()
def api(settings: Settings) -> Iterator[ApiServer]:
    with ApiServer(settings, keepalive_s=0.2) as server:
        yield server


@pytest.fixture()
def bus(redis_client: redis.Redis) -> EventBus:
    return EventBus(redis_client)


def make_task(settings: Settings) -> str:
    """A task row, as the producer writes it (events are published by the tests)."""
    store = Store.from_url(settings.database_url)
    job = parse_job({"images": ["s3://photos/a.png"], "prompt": "What is it?"})
    store.create_task(job)
    store.dispose()
    return job.task_id


def publish_run(bus: EventBus, task_id: str, deltas: int, *, terminal: bool) -> None:
    for i in range(deltas):
        bus.publish(task_id, ev.REASONING_DELTA if i % 2 else ev.ANSWER_DELTA, 1, text=f"<{i}>")
    if terminal:
        bus.publish(task_id, ev.COMPLETED, 1, answer="done")


def stream(api: ApiServer, task_id: str, *, headers: dict[str, str] | None = None,
           params: dict[str, Any] | None = None) -> Any:
    return httpx.stream("GET", f"{api.url}/v1/tasks/{task_id}/events", headers=headers, params=params,
                        timeout=httpx.Timeout(10.0))


# -- SSE ---------------------------------------------------------------------------------------
def test_sse_replays_the_log_then_streams_live_and_ends_after_the_terminal_event(
        api: ApiServer, settings: Settings, bus: EventBus) -> None:
    task_id = make_task(settings)
    publish_run(bus, task_id, 4, terminal=False)  # the viewer arrives halfway
    threading.Timer(0.4, lambda: publish_run(bus, task_id, 4, terminal=True)).start()
    with stream(api, task_id) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        frames = list(sse_frames(response))  # returns only because the server ends the stream
    events = [f for f in frames if "data" in f]
    assert [int(f["id"]) for f in events] == list(range(1, 10))
    assert [f["data"]["seq"] for f in events] == list(range(1, 10))
    assert all(f["event"] == f["data"]["type"] for f in events)
    assert events[-1]["event"] == ev.COMPLETED
    assert frames[0] == {"retry": "3000"}


def test_a_viewer_that_drops_mid_run_and_reconnects_with_last_event_id_gets_exactly_the_rest(
        api: ApiServer, settings: Settings, bus: EventBus, redis_client: redis.Redis) -> None:
    task_id = make_task(settings)
    publish_run(bus, task_id, 6, terminal=False)
    with stream(api, task_id) as response:
        first = sse_events(response, limit=4)  # then the client goes away mid-stream
    assert [int(f["id"]) for f in first] == [1, 2, 3, 4]

    # The server notices the disconnect and releases the subscription.
    deadline = time.monotonic() + 5
    while dict(redis_client.pubsub_numsub(keys.channel(task_id)))[keys.channel(task_id).encode()] and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    assert dict(redis_client.pubsub_numsub(keys.channel(task_id)))[keys.channel(task_id).encode()] == 0

    publish_run(bus, task_id, 3, terminal=True)  # seq 7..9, then the terminal 10, while it was away
    with stream(api, task_id, headers={"Last-Event-ID": first[-1]["id"]}) as response:
        rest = sse_events(response)
    assert [int(f["id"]) for f in rest] == [5, 6, 7, 8, 9, 10]
    texts = [f["data"].get("text") for f in first + rest]
    assert texts[:9] == [f"<{i}>" for i in range(6)] + [f"<{i}>" for i in range(3)]

    # A reconnect after the terminal event: nothing more will come, 204 tells EventSource to stop.
    with stream(api, task_id, headers={"Last-Event-ID": "10"}) as response:
        assert response.status_code == 204


def test_from_seq_query_and_last_event_id_together(api: ApiServer, settings: Settings, bus: EventBus) -> None:
    task_id = make_task(settings)
    publish_run(bus, task_id, 6, terminal=True)
    with stream(api, task_id, params={"from_seq": 4}) as response:
        assert [int(f["id"]) for f in sse_events(response)] == [5, 6, 7]
    with stream(api, task_id, params={"from_seq": 2}, headers={"Last-Event-ID": "5"}) as response:
        assert [int(f["id"]) for f in sse_events(response)] == [6, 7]  # the later of the two wins
    with stream(api, task_id, params={"from_seq": -1}) as response:
        response.read()
        assert response.status_code == 422
        assert response.json()["error"]["field"] == "from_seq"


def test_keep_alive_comments_while_the_task_is_quiet(api: ApiServer, settings: Settings, bus: EventBus) -> None:
    task_id = make_task(settings)
    bus.publish(task_id, ev.QUEUED, 0)
    frames, comment_times = [], []
    with stream(api, task_id) as response:
        for frame in sse_frames(response):
            frames.append(frame)
            if frame.get("comment") == "keep-alive":
                comment_times.append(time.monotonic())
                if len(comment_times) == 3:  # three in a row, then the task ends
                    bus.publish(task_id, ev.CANCELLED, 0)
    assert len(comment_times) == 3
    assert comment_times[2] - comment_times[0] >= 0.3  # spaced by the interval (0.2 s), not a burst
    assert [f["event"] for f in frames if "event" in f] == [ev.QUEUED, ev.CANCELLED]


def test_unknown_task_is_404_with_an_error_body(api: ApiServer) -> None:
    for method, path in [("GET", "/v1/tasks/nope"), ("GET", "/v1/tasks/nope/events"),
                         ("POST", "/v1/tasks/nope/cancel")]:
        response = httpx.request(method, api.url + path)
        assert response.status_code == 404, path
        assert response.json() == {"error": {"code": "task.not_found", "message": "no task 'nope'",
                                             "field": "task_id"}}


def test_expired_events_of_a_finished_task_are_410(
        api: ApiServer, settings: Settings, bus: EventBus, redis_client: redis.Redis) -> None:
    task_id = make_task(settings)
    httpx.post(f"{api.url}/v1/tasks/{task_id}/cancel").raise_for_status()  # queued -> cancelled
    redis_client.delete(keys.log_key(task_id), keys.seq_key(task_id))  # as after QVQ_EVENT_TTL_S
    response = httpx.get(f"{api.url}/v1/tasks/{task_id}/events")
    assert response.status_code == 410 and response.json()["error"]["code"] == "events.expired"


# -- tasks -------------------------------------------------------------------------------------
def test_post_tasks_validates_the_request(api: ApiServer) -> None:
    url = api.url + "/v1/tasks"
    bad_model = httpx.post(url, json={"images": ["s3://b/k.png"], "prompt": "hi", "model": "qvq-ultra"})
    assert bad_model.status_code == 422
    error = bad_model.json()["error"]
    assert error["code"] == "model.unknown" and error["field"] == "model" and "qvq-ultra" in error["message"]

    no_images = httpx.post(url, json={"prompt": "hi"})
    assert no_images.status_code == 422
    assert no_images.json()["error"]["field"] == "images"
    assert no_images.json()["error"]["code"] == "request.invalid"

    unknown = httpx.post(url, json={"images": ["s3://b/k.png"], "prompt": "hi", "colour": "red"})
    assert unknown.status_code == 422 and unknown.json()["error"]["field"] == "colour"

    for body in (b"{not json", b"[1, 2]", b""):
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"})
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "request.invalid"


def test_submit_get_and_cancel_a_queued_task(api: ApiServer) -> None:
    body = {"images": ["s3://photos/a.png"], "prompt": "hi", "idempotency_key": "order-7", "metadata": {"n": 1}}
    created = httpx.post(api.url + "/v1/tasks", json=body)
    assert created.status_code == 202
    task_id = created.json()["task_id"]
    assert created.json() == {"task_id": task_id, "created": True}
    assert created.headers["location"] == f"/v1/tasks/{task_id}"
    again = httpx.post(api.url + "/v1/tasks", json=body)
    assert again.status_code == 200 and again.json() == {"task_id": task_id, "created": False}

    record = httpx.get(f"{api.url}/v1/tasks/{task_id}").json()
    assert record["task_id"] == task_id and record["status"] == "queued" and record["metadata"] == {"n": 1}

    cancelled = httpx.post(f"{api.url}/v1/tasks/{task_id}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json() == {"task_id": task_id, "cancel_requested": True, "status": "cancelled"}
    assert httpx.post(f"{api.url}/v1/tasks/{task_id}/cancel").json()["cancel_requested"] is False
    with stream(api, task_id) as response:
        assert [f["event"] for f in sse_events(response)] == [ev.QUEUED, ev.CANCELLED]


def test_retry_requeues_a_cancelled_task_and_refuses_a_queued_one(api: ApiServer) -> None:
    body = {"images": ["s3://photos/a.png"], "prompt": "hi"}
    task_id = httpx.post(api.url + "/v1/tasks", json=body).json()["task_id"]
    refused = httpx.post(f"{api.url}/v1/tasks/{task_id}/retry")
    assert refused.status_code == 409 and "queued" in refused.json()["error"]["message"]
    httpx.post(f"{api.url}/v1/tasks/{task_id}/cancel")
    retried = httpx.post(f"{api.url}/v1/tasks/{task_id}/retry")
    assert retried.status_code == 202
    assert retried.json() == {"task_id": task_id, "from_seq": 2}  # after queued, cancelled
    assert httpx.get(f"{api.url}/v1/tasks/{task_id}").json()["status"] == "queued"
    assert httpx.post(f"{api.url}/v1/tasks/nope/retry").status_code == 404


def test_healthz_and_the_web_page(api: ApiServer) -> None:
    health = httpx.get(api.url + "/healthz")
    assert health.status_code == 200 and health.json() == {"status": "ok", "redis": True, "database": True}
    page = httpx.get(api.url + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "EventSource" in page.text and "task.retrying" in page.text


# -- API keys ----------------------------------------------------------------------------------
def test_api_keys_are_required_when_configured(settings: Settings, bus: EventBus) -> None:
    keyed = settings.with_overrides(api_keys=("k-one-0123456789abcdef", "k-two-0123456789abcdef"))
    task_id = make_task(settings)
    publish_run(bus, task_id, 2, terminal=True)
    with ApiServer(keyed, keepalive_s=0.2) as api:
        task_url = f"{api.url}/v1/tasks/{task_id}"
        missing = httpx.get(task_url)
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "auth.required"
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = httpx.get(task_url, headers={"Authorization": "Bearer k-three-0123456789abcdef"})
        assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "auth.invalid"
        assert httpx.get(task_url, headers={"Authorization": "Basic azpvbmU="}).status_code == 401
        assert httpx.get(task_url, headers={"Authorization": "Bearer k-two-0123456789abcdef"}).status_code == 200
        assert httpx.get(task_url, params={"api_key": "k-one-0123456789abcdef"}).status_code == 401  # events only
        assert httpx.post(f"{api.url}/v1/tasks", json={}).status_code == 401  # before validation
        with stream(api, task_id, params={"api_key": "k-one-0123456789abcdef"}) as response:  # EventSource style
            assert [int(f["id"]) for f in sse_events(response)] == [1, 2, 3]
        assert httpx.get(api.url + "/healthz").status_code == 200
        assert httpx.get(api.url + "/").status_code == 200


def test_the_access_log_never_shows_an_api_key() -> None:
    import logging

    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                               ("1.2.3.4", "GET", "/v1/tasks/x/events?api_key=s3cret&from_seq=2", "1.1", 200), None)
    RedactedArgs().filter(record)
    assert "s3cret" not in record.getMessage() and "api_key=***&from_seq=2" in record.getMessage()


# -- whole runs --------------------------------------------------------------------------------
def test_whole_runs_through_the_api_with_a_real_worker(
        service_env: dict[str, str], start_worker: Any, tmp_path: Path) -> None:
    """JSON submit (with a retry injected into the emulator's first attempt) and a multipart upload,
    each streamed over SSE to the end; the streamed text matches the persisted record."""
    uploads = str(tmp_path / "uploads")
    start_worker(QVQ_UPLOAD_URL=uploads, QVQ_ALLOW_LOCAL_FILES="0")  # uploads are read without it
    settings = Settings.from_env({**service_env, "QVQ_UPLOAD_URL": uploads})
    image = tmp_path / "red.png"
    image.write_bytes(make_image("PNG", size=(96, 64), color=(220, 20, 20)))
    with ApiServer(settings, keepalive_s=1.0) as api:
        with image.open("rb") as handle:
            upload = httpx.post(api.url + "/v1/uploads", files={"file": ("red.png", handle, "image/png")})
        assert upload.status_code == 201, upload.text
        assert upload.json()["ref"].startswith("upload://") and upload.json()["format"] == "PNG"
        created = httpx.post(api.url + "/v1/tasks", json={
            "images": [upload.json()["ref"]], "model": "qvq-plus",
            "prompt": "Which colour? [[emulator: fault=cut:6@1]]"})
        assert created.status_code == 202, created.text
        json_task = created.json()["task_id"]

        with image.open("rb") as handle:
            uploaded = httpx.post(api.url + "/v1/tasks/upload", data={"prompt": "Describe it."},
                                  files=[("images", ("photo.png", handle, "image/png"))])
        assert uploaded.status_code == 202, uploaded.text
        upload_task = uploaded.json()["task_id"]

        for task_id, retried in ((json_task, True), (upload_task, False)):
            with stream(api, task_id) as response:
                events = [f["data"] for f in sse_events(response)]
            types = [e["type"] for e in events]
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert types[0] == ev.QUEUED and types[-1] == ev.COMPLETED, types
            assert (ev.RETRYING in types) is retried
            after_retry = events[types.index(ev.RETRYING) + 1:] if retried else events
            answer = "".join(e["text"] for e in after_retry if e["type"] == ev.ANSWER_DELTA)
            record = httpx.get(f"{api.url}/v1/tasks/{task_id}").json()
            assert record["status"] == "completed" and record["answer"] == answer == events[-1]["answer"]
            assert record["attempts"] == (2 if retried else 1)
            assert "96x64" in record["reasoning"] and "red" in record["reasoning"]
            assert events[-1]["cost"]["currency"] == "CNY"

        uploaded_ref = next(e for e in events if e["type"] == ev.IMAGES_READY)["images"][0]["ref"]
        assert uploaded_ref.startswith("upload://")


def test_upload_limits(settings: Settings, tmp_path: Path) -> None:
    png = make_image("PNG", size=(32, 32), color=(0, 0, 200))
    uploads = tmp_path / "uploads"
    with ApiServer(settings.with_overrides(max_image_bytes=len(png) + 10), upload_dir=uploads) as api:
        too_big = httpx.post(api.url + "/v1/tasks/upload", data={"prompt": "hi"},
                             files=[("images", ("a.png", png, "image/png")),
                                    ("images", ("b.png", png + b"x" * 2000, "image/png"))])
        assert too_big.status_code == 413
        error = too_big.json()["error"]
        assert error["code"] == "image.too_large" and error["field"] == "images[1]" and "b.png" in error["message"]
        missing_prompt = httpx.post(api.url + "/v1/tasks/upload", files=[("images", ("a.png", png, "image/png"))])
        assert missing_prompt.status_code == 422 and missing_prompt.json()["error"]["field"] == "prompt"
        bad_model = httpx.post(api.url + "/v1/tasks/upload", data={"prompt": "hi", "model": "gpt"},
                               files=[("images", ("a.png", png, "image/png"))])
        assert bad_model.status_code == 422 and bad_model.json()["error"]["code"] == "model.unknown"
        not_image = httpx.post(api.url + "/v1/uploads", files={"file": ("a.png", b"hello, world", "image/png")})
        assert not_image.status_code == 422 and not_image.json()["error"]["code"] == "image.unsupported_format"
    assert not uploads.exists() or list(uploads.iterdir()) == []  # nothing left behind by refused uploads


def test_sse_frames_are_single_line_json() -> None:
    from contracts.bus.sse import format_sse

    frame = format_sse({"seq": 3, "type": ev.ANSWER_DELTA, "text": "line one\nline two\n\nend"})
    assert frame.endswith("\n\n") and frame.count("\n") == 4
    assert json.loads(frame.split("data: ", 1)[1])["text"] == "line one\nline two\n\nend"


def test_the_viewer_page_listens_to_every_event_type(settings: Settings) -> None:
    """The page gets its list of event types from contracts/events.py when the app is built."""
    with ApiServer(settings) as api:
        page = httpx.get(api.url + "/")
    types = json.loads(re.search(r"const TYPES = (\[.*?\]);", page.text).group(1))  # type: ignore[union-attr]
    assert types == list(ev.EVENT_TYPES) and ev.WAITING in types
    policy = page.headers["content-security-policy"]
    script = re.search(r"<script>(.*?)</script>", page.text, re.S).group(1)  # type: ignore[union-attr]
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert f"'sha256-{digest}'" in policy  # the page as served is the one its policy allows


def test_an_image_part_without_a_file_name_is_a_file(settings: Settings, tmp_path: Path) -> None:
    """Generated clients (and httpx without a name) send binary parts with a Content-Type and no filename."""
    png = make_image("PNG", size=(32, 24), color=(0, 120, 0))
    with ApiServer(settings, upload_dir=tmp_path / "uploads") as api:
        unnamed = httpx.post(api.url + "/v1/uploads", files={"file": (None, png, "image/png")})
        assert unnamed.status_code == 201, unnamed.text
        assert unnamed.json()["format"] == "PNG" and unnamed.json()["bytes"] == len(png)
        as_text = httpx.post(api.url + "/v1/uploads", files={"file": (None, b"hello", "text/plain")})
        assert as_text.status_code == 422 and as_text.json()["error"]["field"] == "file"
