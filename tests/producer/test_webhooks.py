"""Inbound webhooks over real HTTP: signed job requests, and object notifications (MinIO, S3, OSS through
MNS and EventBridge) that become exactly one task per object version, across processes."""

from __future__ import annotations

import base64
import copy
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from contracts.settings import Settings
from contracts.store import Store
from contracts.webhook import sign
from tests.imagegen import make_image
from tests.producer import ApiServer

pytestmark = pytest.mark.timeout(120)

ACME, GLOBEX, ADMIN = "acme-key-0123456789abcdef", "globex-key-0123456789abcdef", "admin-key-0123456789abcdef"
SECRET, ACME_SECRET = "admin-webhook-secret-0123456789", "acme-webhook-secret-0123456789"
RULES = [
    {"bucket": "photos", "prefix": "in/", "suffix": ".png", "prompt": "What colour is it?", "model": "qvq-plus"},
    {"bucket": "globex-bucket", "prompt": "Describe it.", "tenant": "globex"},
    {"bucket": "examplebucket", "prompt": "Describe it.", "tenant": "acme"},
    {"bucket": "testbucket", "prefix": "image/", "prompt": "What is it?", "high_resolution": True},
]


def env(base: dict[str, str], tmp_path: Path) -> dict[str, str]:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps(RULES))
    return {**base, "QVQ_API_KEYS": f"acme:{ACME},globex:{GLOBEX},{ADMIN}", "QVQ_WEBHOOK_SECRET": SECRET,
            "QVQ_WEBHOOK_SECRETS": f"acme:{ACME_SECRET}", "QVQ_TRIGGERS": f"@{rules}"}


@pytest.fixture()
def settings(redis_url: str, redis_client: redis.Redis, sqlite_url: str, tmp_path: Path) -> Settings:
    return Settings.from_env(env({"REDIS_URL": redis_url, "DATABASE_URL": sqlite_url}, tmp_path))


@pytest.fixture()
def api(settings: Settings) -> Iterator[ApiServer]:
    with ApiServer(settings) as server:
        yield server


def rows(settings: Settings) -> list[Any]:
    store = Store.from_url(settings.database_url)
    try:
        return store.list_tasks(limit=1000)
    finally:
        store.dispose()


def queued_messages(redis_client: redis.Redis) -> int:
    return int(redis_client.llen("qvq"))


def post_signed(api: ApiServer, body: bytes, secret: str = SECRET, timestamp: int | None = None,
                header: str | None = None) -> httpx.Response:
    signature = header if header is not None else sign(body, secret, timestamp)
    return httpx.post(api.url + "/v1/webhooks/jobs", content=body,
                      headers={"Content-Type": "application/json", "X-Qvq-Signature": signature})


# -- signed job requests -----------------------------------------------------------------------
def test_a_signed_job_is_enqueued_once_and_a_replay_returns_the_same_task(
        api: ApiServer, settings: Settings, redis_client: redis.Redis) -> None:
    body = json.dumps({"images": ["s3://photos/a.png"], "prompt": "What is it?", "tenant": "globex"}).encode()
    signature = sign(body, SECRET)
    first = post_signed(api, body, header=signature)
    assert first.status_code == 202, first.text
    assert first.json()["created"] is True
    replay = post_signed(api, body, header=signature)
    assert replay.status_code == 202 and replay.json() == {"task_id": first.json()["task_id"], "created": False}
    [row] = rows(settings)
    assert row.id == first.json()["task_id"] and row.tenant == "globex"  # the admin-level secret may name one
    assert queued_messages(redis_client) == 1


def test_a_tenant_secret_binds_the_job_to_its_tenant(api: ApiServer, settings: Settings) -> None:
    body = json.dumps({"images": ["s3://photos/a.png"], "prompt": "What is it?"}).encode()
    created = post_signed(api, body, ACME_SECRET)
    assert created.status_code == 202, created.text
    assert rows(settings)[0].tenant == "acme"
    other = json.dumps({"images": ["s3://photos/a.png"], "prompt": "hi", "tenant": "globex"}).encode()
    refused = post_signed(api, other, ACME_SECRET)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "auth.forbidden"
    assert len(rows(settings)) == 1


@pytest.mark.parametrize("case", ["bad_signature", "old_timestamp", "future_timestamp", "missing", "wrong_secret",
                                  "garbage"])
def test_a_bad_or_stale_signature_is_401_and_nothing_is_enqueued(
        api: ApiServer, settings: Settings, redis_client: redis.Redis, case: str) -> None:
    body = json.dumps({"images": ["s3://photos/a.png"], "prompt": "What is it?"}).encode()
    now = int(time.time())
    header = {
        "bad_signature": sign(body + b" ", SECRET),
        "old_timestamp": sign(body, SECRET, now - 301),  # the window is 300 s
        "future_timestamp": sign(body, SECRET, now + 310),  # + a margin: the server reads its clock later
        "missing": "",
        "wrong_secret": sign(body, "another-secret-0123456789abcdef"),
        "garbage": "t=abc,v1=" + "z" * 64,
    }[case]
    response = post_signed(api, body, header=header)
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] in {"auth.invalid", "auth.required"}
    assert SECRET not in response.text
    assert rows(settings) == [] and queued_messages(redis_client) == 0


# -- object notifications: fixtures in the vendors' documented shapes --------------------------
def minio_event(bucket: str, encoded_key: str, etag: str, version: str = "", sequencer: str = "17A9E1B2C3D4E5F6",
                name: str = "s3:ObjectCreated:Put") -> dict[str, Any]:
    """What a MinIO webhook target POSTs (`mc event add ... arn:minio:sqs::qvq:webhook --event put`)."""
    return {
        "EventName": name, "Key": f"{bucket}/{encoded_key}",
        "Records": [{
            "eventVersion": "2.0", "eventSource": "minio:s3", "awsRegion": "", "eventTime": "2026-12-02T05:00:00.000Z",
            "eventName": name, "userIdentity": {"principalId": "minioadmin"},
            "requestParameters": {"principalId": "minioadmin", "region": "", "sourceIPAddress": "127.0.0.1"},
            "responseElements": {"x-amz-id-2": "dd9025bab4ad464b", "x-amz-request-id": "17A9E1B2C3D4E5F6",
                                 "x-minio-deployment-id": "d3b2c1a0", "x-minio-origin-endpoint": "http://127.0.0.1:9000"},
            "s3": {"s3SchemaVersion": "1.0", "configurationId": "Config",
                   "bucket": {"name": bucket, "ownerIdentity": {"principalId": "minioadmin"},
                              "arn": f"arn:aws:s3:::{bucket}"},
                   "object": {"key": encoded_key, "size": 1024, "eTag": etag, "contentType": "image/png",
                              "userMetadata": {"content-type": "image/png"}, "versionId": version,
                              "sequencer": sequencer}},
            "source": {"host": "127.0.0.1", "port": "", "userAgent": "MinIO (linux; amd64) minio-go/v7.0.70"}}],
    }


#: Alibaba OSS event notification (the documented sample: the FC OSS trigger / MNS message body).
OSS_EVENTS = {"events": [{
    "eventName": "ObjectCreated:PutObject", "eventSource": "acs:oss", "eventTime": "2017-04-21T12:46:37.000Z",
    "eventVersion": "1.0",
    "oss": {"bucket": {"arn": "acs:oss:cn-shanghai:123456789:bucketname", "name": "testbucket",
                       "ownerIdentity": "123456789", "virtualBucket": ""},
            "object": {"deltaSize": 122539, "eTag": "688A7BF4F233DC9C88A80BF985AB7329", "key": "image/a.jpg",
                       "size": 122539},
            "ossSchemaVersion": "1.0", "ruleId": "9adac8e253828f4f7c0466d941fa3db81161e853"},
    "region": "cn-shanghai", "requestParameters": {"sourceIPAddress": "140.205.128.221"},
    "responseElements": {"requestId": "58F9FF2D3DF792092E12044C"}, "userIdentity": {"principalId": "123456789"}}]}

#: Alibaba EventBridge OSS event (CloudEvents 1.0, the documented sample's shape).
EVENTBRIDGE_OSS = {
    "datacontenttype": "application/json;charset=utf-8", "aliyunaccountid": "123456789",
    "aliyunpublishtime": "2021-04-08T06:28:17.093Z", "aliyuneventbusname": "default", "aliyunregionid": "cn-hangzhou",
    "id": "c2g71017-6f65-fhcf-a814-a396fc8d****", "source": "acs.oss", "specversion": "1.0",
    "subject": "acs:oss:cn-hangzhou:123456789:examplebucket/exampleobject.png",
    "time": "2021-04-08T06:28:17.093Z", "type": "oss:ObjectCreated:PutObject",
    "data": {"eventName": "ObjectCreated:PutObject", "eventSource": "acs:oss", "eventTime": "2021-04-08T06:28:17.000Z",
             "eventVersion": "1.0", "region": "cn-hangzhou",
             "oss": {"bucket": {"arn": "acs:oss:cn-hangzhou:123456789:examplebucket", "name": "examplebucket",
                                "ownerIdentity": "123456789", "virtualBucket": ""},
                     "object": {"deltaSize": 13, "eTag": "8DB6D8C1B4F6E0D6A0AB2DA0C9D2F1E3",
                                "key": "exampleobject.png", "size": 13, "objectMeta": {"mimeType": "image/png"}},
                     "ossSchemaVersion": "1.0", "ruleId": "a6a9b5d3a8e4c7f1"}}}


def notify(api: ApiServer, body: Any, key: str = ADMIN, *, raw: bytes | None = None,
           content_type: str = "application/json") -> httpx.Response:
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(api.url + "/v1/webhooks/objects", content=content, timeout=30,
                      headers={"Authorization": f"Bearer {key}", "Content-Type": content_type})


def test_an_uploaded_object_notified_in_minios_format_runs_once_even_notified_twice_to_two_apis(
        service_env: dict[str, str], start_worker: Any, s3: Any, tmp_path: Path) -> None:
    settings = Settings.from_env(env(service_env, tmp_path))
    start_worker()
    key = "in/my cat+1.png"  # a space and a plus: MinIO sends "in/my+cat%2B1.png"
    s3.create_bucket("photos")
    s3.put("photos", key, make_image("PNG", size=(80, 60), color=(20, 200, 20)), "image/png")
    event = minio_event("photos", "in/my+cat%2B1.png", etag="5d41402abc4b2a76b9719d911017c592")
    with ApiServer(settings) as first, ApiServer(settings) as second:
        created = notify(first, event, ACME)
        assert created.status_code == 202, created.text
        [task] = created.json()["tasks"]
        assert task["ref"] == "s3://photos/in/my cat+1.png" and task["created"] is True
        assert created.json()["ignored"] == 0
        again, elsewhere = notify(first, event, ACME), notify(second, event, ACME)
        for response in (again, elsewhere):
            assert response.status_code == 202
            assert response.json()["tasks"] == [{**task, "created": False}]
        record = wait_terminal(first, task["task_id"], ACME)
    assert record["status"] == "completed", record
    assert record["tenant"] == "acme" and record["model"] == "qvq-plus"
    assert record["request"]["images"] == ["s3://photos/in/my cat+1.png"]
    assert record["images"][0]["ref"] == "s3://photos/in/my cat+1.png" and "80x60" in record["reasoning"]
    assert [r.id for r in rows(settings)] == [task["task_id"]]


def wait_terminal(api: ApiServer, task_id: str, key: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record: dict[str, Any] = httpx.get(f"{api.url}/v1/tasks/{task_id}",
                                           headers={"Authorization": f"Bearer {key}"}).json()
        if record["status"] in {"completed", "failed", "cancelled"}:
            return record
        time.sleep(0.1)
    raise AssertionError(f"task {task_id} did not finish")


def test_a_new_version_of_the_same_key_is_a_new_task(api: ApiServer, settings: Settings) -> None:
    first = notify(api, minio_event("photos", "in/a.png", etag="aaaa"))
    second = notify(api, minio_event("photos", "in/a.png", etag="bbbb"))
    assert first.json()["tasks"][0]["task_id"] != second.json()["tasks"][0]["task_id"]
    assert len(rows(settings)) == 2


def test_oss_notifications_through_mns_and_eventbridge_become_oss_tasks(api: ApiServer, settings: Settings) -> None:
    plain = notify(api, OSS_EVENTS)
    assert plain.status_code == 202, plain.text
    [task] = plain.json()["tasks"]
    assert task["ref"] == "oss://testbucket/image/a.jpg" and task["created"]
    encoded = base64.b64encode(json.dumps(OSS_EVENTS).encode())  # MNS may carry the body base64-encoded
    assert notify(api, None, raw=encoded, content_type="text/plain").json()["tasks"] == [{**task, "created": False}]
    envelope = (b'<?xml version="1.0" encoding="utf-8"?><Notification xmlns="http://mns.aliyuncs.com/doc/v1/">'
                b"<TopicOwner>123456789</TopicOwner><TopicName>oss-events</TopicName><Subscriber>123456789</Subscriber>"
                b"<SubscriptionName>qvq</SubscriptionName><MessageId>C39FB8C345BBFBA8-1-15D2C0DB3E6-200000001</MessageId>"
                b"<MessageMD5>D2A9D4D2E2F6A1D3C3B5F4D1E5B2A3C4</MessageMD5><Message>" + encoded + b"</Message>"
                b"<PublishTime>1493178765981</PublishTime></Notification>")
    assert notify(api, None, raw=envelope, content_type="text/xml").json()["tasks"] == [{**task, "created": False}]

    bridged = notify(api, EVENTBRIDGE_OSS, ACME)
    assert bridged.status_code == 202, bridged.text
    [other] = bridged.json()["tasks"]
    assert other["ref"] == "oss://examplebucket/exampleobject.png"
    by_id = {row.id: row for row in rows(settings)}
    assert by_id[task["task_id"]].request["images"] == ["oss://testbucket/image/a.jpg"]
    assert by_id[task["task_id"]].request["high_resolution"] is True and by_id[task["task_id"]].tenant is None
    assert by_id[other["task_id"]].request["images"] == ["oss://examplebucket/exampleobject.png"]
    assert by_id[other["task_id"]].tenant == "acme"


def test_s3_events_through_sns_are_unwrapped_and_the_subscription_confirmation_is_acknowledged(
        api: ApiServer, settings: Settings) -> None:
    records = {"Records": [{
        "eventVersion": "2.1", "eventSource": "aws:s3", "awsRegion": "us-east-1", "eventTime": "2026-12-02T05:00:00.000Z",
        "eventName": "ObjectCreated:Put", "userIdentity": {"principalId": "EXAMPLE"},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {"x-amz-request-id": "EXAMPLE123456789", "x-amz-id-2": "EXAMPLE123/5678abcdefgh"},
        "s3": {"s3SchemaVersion": "1.0", "configurationId": "testConfigRule",
               "bucket": {"name": "photos", "ownerIdentity": {"principalId": "EXAMPLE"}, "arn": "arn:aws:s3:::photos"},
               "object": {"key": "in/Happy+Face.png", "size": 1024, "eTag": "0123456789abcdef0123456789abcdef",
                          "sequencer": "0A1B2C3D4E5F678901"}}}]}
    envelope = {"Type": "Notification", "MessageId": "7a598f1d-8eed-509f-803d-dcb1fc08f290",
                "TopicArn": "arn:aws:sns:us-east-1:123456789012:qvq", "Subject": "Amazon S3 Notification",
                "Message": json.dumps(records), "Timestamp": "2026-12-02T05:00:00.705Z", "SignatureVersion": "1"}
    created = httpx.post(f"{api.url}/v1/webhooks/objects?api_key={ADMIN}", content=json.dumps(envelope),
                         headers={"Content-Type": "text/plain; charset=UTF-8"})  # what SNS sends
    assert created.status_code == 202, created.text
    assert [t["ref"] for t in created.json()["tasks"]] == ["s3://photos/in/Happy Face.png"]
    confirmation = {"Type": "SubscriptionConfirmation", "MessageId": "165545c9", "Token": "2336412f37",
                    "TopicArn": "arn:aws:sns:us-east-1:123456789012:qvq", "Message": "You have chosen to subscribe",
                    "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=2336412f37"}
    assert notify(api, confirmation).json() == {"tasks": [], "ignored": 1}
    assert len(rows(settings)) == 1


def test_test_events_other_events_and_unmatched_objects_are_acknowledged_and_ignored(
        api: ApiServer, settings: Settings, redis_client: redis.Redis) -> None:
    removed = minio_event("photos", "in/a.png", etag="aaaa", name="s3:ObjectRemoved:Delete")
    part = copy.deepcopy(EVENTBRIDGE_OSS)
    part["type"] = "oss:ObjectCreated:UploadPart"  # a step of a multipart upload: no whole object yet
    unmatched = minio_event("photos", "elsewhere/a.png", etag="aaaa")
    test_event = {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-12-02T05:00:00.000Z",
                  "Bucket": "photos", "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3e"}
    for body in (removed, unmatched, test_event, part):
        response = notify(api, body)
        assert response.status_code == 202, response.text
        assert response.json() == {"tasks": [], "ignored": 1}
    assert rows(settings) == [] and queued_messages(redis_client) == 0


def test_refusals_enqueue_nothing(api: ApiServer, settings: Settings, redis_client: redis.Redis) -> None:
    globex_object = minio_event("globex-bucket", "x.png", etag="cccc")
    both = copy.deepcopy(minio_event("photos", "in/ok.png", etag="dddd"))
    both["Records"] += globex_object["Records"]
    missing_key = httpx.post(api.url + "/v1/webhooks/objects", json=globex_object)
    assert missing_key.status_code == 401
    assert notify(api, globex_object, "not-a-key-0123456789abcdef").status_code == 401
    for body in (globex_object, both):  # one object of another tenant's rule refuses the whole notification
        refused = notify(api, body, ACME)
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "auth.forbidden"
    malformed = [{"hello": "world"}, [None, None], "[]", [[minio_event("photos", "in/x.png", etag="e")]],
                 {"Records": [5]}, {"Records": [{"eventName": 5}]}, {"Records": [{"s3": "photos"}]},
                 {"Records": [{"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "photos"}, "object": {}}}]},
                 {"Records": [{"s3": {"bucket": {"name": "photos"}, "object": {"key": "a\u0000.png"}}}]},
                 {"type": "oss:ObjectCreated:PutObject", "data": {"oss": {"bucket": None}}}]
    for body in malformed:  # none of the documented shapes: refused whole, even records that would be ignored
        refused = notify(api, body)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "request.invalid", (body, refused.text)
    assert rows(settings) == [] and queued_messages(redis_client) == 0
    assert notify(api, globex_object, GLOBEX).status_code == 202  # its own tenant's key may
    assert notify(api, globex_object, ADMIN).json()["tasks"][0]["created"] is False  # so may an admin key


def test_a_bad_rule_fails_at_start_naming_the_rule_and_field(tmp_path: Path) -> None:
    from contracts.errors import ConfigError

    for rules, expected in (
        ([{"bucket": "b"}], "QVQ_TRIGGERS rule 1: field 'prompt' is required"),
        ([{"bucket": "b", "prompt": "p"}, {"bucket": "b", "prompt": "p", "model": "gpt"}], "rule 2: field 'model'"),
        ([{"bucket": "b", "prompt": "p", "colour": 1}], "rule 1: unknown field 'colour'"),
        ("{", "QVQ_TRIGGERS: not valid JSON"),
    ):
        raw = rules if isinstance(rules, str) else json.dumps(rules)
        with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
            Settings.from_env({"QVQ_TRIGGERS": raw})
    with pytest.raises(ConfigError, match="cannot read"):
        Settings.from_env({"QVQ_TRIGGERS": f"@{tmp_path / 'missing.json'}"})
