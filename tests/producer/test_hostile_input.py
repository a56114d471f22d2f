"""Input nobody meant to send, over real HTTP on SQLite and PostgreSQL: NUL and lone surrogates in every
string a request carries, JSON nested 100,000 levels deep, oversized notifications, decorated webhook
signatures and odd upload file names. Each is refused with a clean JSON error (or, for a file name,
cleaned), and nothing is enqueued or stored by a refused request."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contracts.job import parse_job
from contracts.settings import Settings
from contracts.store import Store
from contracts.webhook import sign
from tests.imagegen import make_image
from tests.producer import ApiServer
from tests.producer.test_webhooks import ADMIN, SECRET, env, minio_event, notify

pytestmark = pytest.mark.timeout(120)
DEEP = 100_000


@pytest.fixture()
def settings(redis_url: str, redis_client: redis.Redis, database_url: str, tmp_path: Path) -> Settings:
    base = env({"REDIS_URL": redis_url, "DATABASE_URL": database_url,
                "QVQ_UPLOAD_URL": str(tmp_path / "uploads"), "QVQ_MAX_NOTIFICATION_RECORDS": "5"}, tmp_path)
    return Settings.from_env(base)


@pytest.fixture()
def api(settings: Settings) -> Iterator[ApiServer]:
    with ApiServer(settings) as server:
        yield server


def stored(settings: Settings) -> int:
    store = Store.from_url(settings.database_url)
    try:
        return len(store.list_tasks(limit=1000))
    finally:
        store.dispose()


def post_task(api: ApiServer, raw: bytes) -> httpx.Response:
    return httpx.post(api.url + "/v1/tasks", content=raw, timeout=30,
                      headers={"Authorization": f"Bearer {ADMIN}", "Content-Type": "application/json"})


JOB = {"images": ["s3://photos/a.png"], "prompt": "What is it?"}
# Raw JSON text, so that a lone surrogate arrives as the escape a hostile client would send.
BAD_STRINGS = {"NUL": "\\u0000", "surrogate": "\\ud800"}
PLACES = {
    "prompt": ('{"images": ["s3://photos/a.png"], "prompt": "What is%s it?"}', "prompt"),
    "image": ('{"images": ["s3://photos/a%s.png"], "prompt": "What is it?"}', "images[0]"),
    "metadata value": ('{"images": ["s3://photos/a.png"], "prompt": "Q", "metadata": {"k": ["x%s"]}}', "metadata.k[0]"),
    "metadata key": ('{"images": ["s3://photos/a.png"], "prompt": "Q", "metadata": {"k%s": 1}}', "metadata"),
    "callback": ('{"images": ["s3://photos/a.png"], "prompt": "Q", "callback_url": "https://example.com/%s"}',
                 "callback_url"),
    "task id": ('{"images": ["s3://photos/a.png"], "prompt": "Q", "task_id": "t%s"}', "task_id"),
}


@pytest.mark.parametrize("bad", sorted(BAD_STRINGS))
@pytest.mark.parametrize("place", sorted(PLACES))
def test_nul_and_lone_surrogates_are_refused_naming_the_field(api: ApiServer, settings: Settings,
                                                              place: str, bad: str) -> None:
    template, field = PLACES[place]
    response = post_task(api, (template % BAD_STRINGS[bad]).encode())
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "request.invalid" and error["field"] == field
    assert stored(settings) == 0
    good = post_task(api, (template % "").encode())  # the same request without it goes through
    assert good.status_code == 202, good.text


def test_an_object_key_with_nul_refuses_the_whole_notification(api: ApiServer, settings: Settings,
                                                                redis_client: redis.Redis) -> None:
    body = minio_event("photos", "in/ok.png", etag="aaaa")
    body["Records"] += minio_event("photos", "in/bad%00.png", etag="bbbb")["Records"]
    response = notify(api, body)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "objects[1].key"
    assert stored(settings) == 0 and redis_client.llen("qvq") == 0


@pytest.mark.parametrize("where", ["tasks", "objects", "objects_sns", "jobs"])
def test_json_nested_100k_levels_deep_is_a_clean_400(api: ApiServer, settings: Settings, where: str) -> None:
    deep = "[" * DEEP + "]" * DEEP
    if where == "tasks":
        response = post_task(api, deep.encode())
    elif where == "objects":
        response = notify(api, None, raw=('{"Records": ' + deep + "}").encode())
    elif where == "objects_sns":
        message = '{"Records": [' + "[" * 200 + "]" * 200 + "]}"  # within Python's stack, past the limit
        response = notify(api, {"Type": "Notification", "Message": message})
    else:
        raw = deep.encode()
        response = httpx.post(api.url + "/v1/webhooks/jobs", content=raw, timeout=30,
                              headers={"Content-Type": "application/json", "X-Qvq-Signature": sign(raw, SECRET)})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "request.invalid" and "nested" in response.json()["error"]["message"]
    assert stored(settings) == 0


def test_a_notification_over_the_record_limit_is_413_and_enqueues_nothing(
        api: ApiServer, settings: Settings, redis_client: redis.Redis) -> None:
    body = minio_event("photos", "in/0.png", etag="e0")
    for index in range(1, 6):  # 6 records, the limit is 5
        body["Records"] += minio_event("photos", f"in/{index}.png", etag=f"e{index}")["Records"]
    response = notify(api, body)
    assert response.status_code == 413 and response.json()["error"]["code"] == "request.too_large"
    assert "QVQ_MAX_NOTIFICATION_RECORDS" in response.json()["error"]["message"]
    assert stored(settings) == 0 and redis_client.llen("qvq") == 0
    body["Records"] = body["Records"][:5]
    assert notify(api, body).status_code == 202


def post_signed(api: ApiServer, body: bytes, header: str) -> httpx.Response:
    return httpx.post(api.url + "/v1/webhooks/jobs", content=body, timeout=30,
                      headers={"Content-Type": "application/json", "X-Qvq-Signature": header})


@pytest.mark.parametrize("decoration", [",zv1=deadbeef", ",x=v1=cafe", ",v0=abc", ",t=1", " ,", ",v1=short"])
def test_a_decorated_signature_cannot_replay_a_signed_job(api: ApiServer, settings: Settings,
                                                          decoration: str) -> None:
    body = json.dumps(JOB).encode()
    header = sign(body, SECRET)
    first = post_signed(api, body, header)
    assert first.status_code == 202 and first.json()["created"] is True
    replay = post_signed(api, body, header + decoration)
    assert replay.status_code == 401, replay.text
    assert stored(settings) == 1


def test_a_replay_with_extra_v1_digests_returns_the_same_task(api: ApiServer, settings: Settings) -> None:
    body = json.dumps(JOB).encode()
    header = sign(body, SECRET)
    first = post_signed(api, body, header)
    stamp, digest = header.split(",")
    rotated = post_signed(api, body, f"{stamp},v1={'0' * 64},{digest}")  # a rotation's two digests
    assert rotated.status_code == 202 and rotated.json() == {"task_id": first.json()["task_id"], "created": False}
    assert stored(settings) == 1


@pytest.mark.parametrize("filename", ["a\x00b.png", "../../etc/passwd", "C:\\temp\\x\x07.png", "\ud800.png"])
def test_an_uploads_file_name_is_cleaned(api: ApiServer, settings: Settings, filename: str) -> None:
    png = make_image("PNG", size=(64, 64))
    header = ("form-data; name=\"file\"; filename=\"" + filename + "\"").encode("utf-8", "surrogateescape"
                                                                               if "\ud800" not in filename else "replace")
    boundary = "qvqboundary"
    raw = (b"--" + boundary.encode() + b"\r\nContent-Disposition: " + header + b"\r\nContent-Type: image/png\r\n\r\n"
           + png + b"\r\n--" + boundary.encode() + b"--\r\n")
    response = httpx.post(api.url + "/v1/uploads", content=raw, timeout=30,
                          headers={"Authorization": f"Bearer {ADMIN}",
                                   "Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert response.status_code == 201, response.text
    store = Store.from_url(settings.database_url)
    try:
        upload: Any = store.get_upload(response.json()["upload_id"])
    finally:
        store.dispose()
    assert upload is not None and upload.filename.isprintable() and "/" not in upload.filename
    assert "\\" not in upload.filename and "\x00" not in upload.filename


@pytest.mark.parametrize("value", ["abc", "-5", "1e3", "9" * 30])
def test_a_bad_last_event_id_is_400(api: ApiServer, value: str) -> None:
    task = post_task(api, json.dumps(JOB).encode()).json()["task_id"]
    response = httpx.get(f"{api.url}/v1/tasks/{task}/events", timeout=30,
                         headers={"Authorization": f"Bearer {ADMIN}", "Last-Event-ID": value})
    assert response.status_code == 400 and response.json()["error"]["field"] == "Last-Event-ID"


def test_a_row_stored_with_a_lone_surrogate_still_reads(api: ApiServer, settings: Settings) -> None:
    """A row written before intake refused such text (JSON columns keep it escaped) answers 200, the
    character shown as U+FFFD, instead of a 500 for ever."""
    job = dataclasses.replace(parse_job(JOB), prompt="What is \ud800 it?", metadata={"k": "\udfff"})
    store = Store.from_url(settings.database_url)
    try:
        store.create_task(job)
    finally:
        store.dispose()
    response = httpx.get(f"{api.url}/v1/tasks/{job.task_id}", headers={"Authorization": f"Bearer {ADMIN}"},
                         timeout=30)
    assert response.status_code == 200, response.text
    assert response.json()["metadata"] == {"k": "\ufffd"}


def test_an_idempotency_key_reused_with_another_prompt_is_409_naming_the_first_task(api: ApiServer) -> None:
    first = post_task(api, json.dumps({**JOB, "idempotency_key": "order-9"}).encode())
    again = post_task(api, json.dumps({**JOB, "idempotency_key": "order-9"}).encode())
    other = post_task(api, json.dumps({**JOB, "prompt": "Another?", "idempotency_key": "order-9"}).encode())
    assert first.status_code == 202 and again.status_code == 200
    assert other.status_code == 409, other.text
    error = other.json()["error"]
    assert error["code"] == "idempotency.mismatch" and first.json()["task_id"] in error["message"]


def test_every_time_carries_its_zone(api: ApiServer) -> None:
    task = post_task(api, json.dumps(JOB).encode()).json()["task_id"]
    record = httpx.get(f"{api.url}/v1/tasks/{task}", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
    listed = httpx.get(f"{api.url}/v1/tasks", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=30).json()
    for moment in (record["created_at"], listed["tasks"][0]["created_at"]):
        assert moment.endswith("Z") and dt.datetime.fromisoformat(moment).tzinfo is not None
