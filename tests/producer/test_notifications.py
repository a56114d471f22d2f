"""Notification bodies read without I/O (producer/api/notifications.py): the version of a write, and the
one-line refusals that name the field."""

from __future__ import annotations

import pytest

from contracts.errors import NotificationError
from producer.api.notifications import parse_notification


def s3(obj: dict[str, object], name: str = "ObjectCreated:Put") -> dict[str, object]:
    return {"Records": [{"eventName": name, "s3": {"bucket": {"name": "photos"}, "object": obj}}]}


@pytest.mark.parametrize(("obj", "version"), [
    ({"key": "a.png", "versionId": "v1", "eTag": "e1"}, "v1"),
    ({"key": "a.png", "versionId": None, "eTag": "e1"}, "e1"),
    ({"key": "a.png", "etag": "e2", "sequencer": "s"}, "e2"),  # some stores spell it in lower case
    ({"key": "a.png", "versionId": "null", "sequencer": "s"}, "s"),
    ({"key": "a.png"}, ""),
])
def test_the_version_of_a_write_is_the_first_one_given(obj: dict[str, object], version: str) -> None:
    (found,) = parse_notification(s3(obj)).objects
    assert found.version == version and found.ref == "s3://photos/a.png"


@pytest.mark.parametrize(("body", "says"), [
    (s3({}), "`Records[0].s3.object.key` is required"),
    (s3({"key": 5}), "`Records[0].s3.object.key` must be a string"),
    (s3({"key": "a", "eTag": 7}, name="ObjectRemoved:Delete"), "`Records[0].s3.object.eTag` must be a string"),
    ({"type": "oss:ObjectCreated:PutObject", "data": {"oss": {"bucket": 5}}}, "`data.oss.bucket` must be an object"),
])
def test_a_malformed_record_is_refused_naming_its_field(body: dict[str, object], says: str) -> None:
    with pytest.raises(NotificationError) as refused:
        parse_notification(body)
    assert refused.value.message.startswith(says)
