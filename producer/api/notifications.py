"""Object-created notifications from object stores, read into one shape (I/O-free).

Formats understood (POST /v1/webhooks/objects takes any of them):

- S3 and MinIO bucket notifications: `{"Records": [{"eventName": "ObjectCreated:Put" (MinIO:
  "s3:ObjectCreated:Put"), "s3": {"bucket": {"name"}, "object": {"key" (URL-encoded, `+` a space),
  "eTag", "versionId", "sequencer"}}}]}`; also wrapped in an SNS notification (`"Type":
  "Notification"`, the records JSON in `Message`). MinIO's `s3:TestEvent` has no records.
- Alibaba OSS event notifications (through MNS): `{"events": [{"eventName": "ObjectCreated:PutObject",
  "oss": {"bucket": {"name"}, "object": {"key", "eTag"}}}]}`, or that JSON base64-encoded, or inside
  an MNS envelope (`Message` holding either).
- Alibaba EventBridge (CloudEvents) OSS events: `{"type": "oss:ObjectCreated:PutObject", "data": {"oss":
  {"bucket": {"name"}, "object": {"key", "eTag"}}}}` (also `data.bucket` / `data.object`), one event
  or a list of them.

Every record that is not an object creation is counted in `ignored`.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from contracts.errors import JsonTooDeep, NotificationError
from contracts.json_shape import loads_bounded
from producer.api.schemas import NO_NUL


@dataclass(frozen=True)
class StoredObject:
    scheme: str  # "s3" or "oss"
    bucket: str
    key: str
    version: str  # versionId, else eTag, else sequencer: what makes this write of the object unique
    event: str

    @property
    def ref(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


@dataclass
class Notification:
    objects: list[StoredObject] = field(default_factory=list)
    ignored: int = 0


def parse_notification(body: Any) -> Notification:
    """The created objects of a notification body (already JSON-decoded). A body is refused
    (NotificationError) unless it is one of NOTIFICATION_SCHEMAS' shapes, an envelope holding one, or a
    list of them; a record that is not an object creation is counted in `ignored`."""
    body = _unwrap(body)
    if isinstance(body, list):
        out = Notification()
        for item in body:
            if not isinstance(_unwrap(item), dict):
                raise NotificationError("a list of notifications holds objects only")
            part = parse_notification(item)
            out.objects += part.objects
            out.ignored += part.ignored
        return out
    if not isinstance(body, dict):
        raise NotificationError("expected an object-store notification (a JSON object)")
    if "s3:TestEvent" in (body.get("Event"), body.get("EventName")) or body.get("Type") == "SubscriptionConfirmation":
        return Notification(ignored=1)  # a store checking the endpoint, or SNS asking to be confirmed
    if "Records" in body:
        return _records(body["Records"], "s3", "s3")
    if "events" in body:
        return _records(body["events"], "oss", "oss")
    if isinstance(body.get("type"), str) and isinstance(body.get("data"), dict):
        return _cloud_event(body)
    raise NotificationError("not a notification this service reads: expected S3/MinIO `Records`, "
                            "OSS `events`, or an EventBridge OSS event")


def _unwrap(body: Any) -> Any:
    """Peel SNS and MNS envelopes, and base64 (OSS through MNS may send its JSON base64-encoded)."""
    for _ in range(3):
        if isinstance(body, dict) and isinstance(body.get("Message"), str) and not (
                "Records" in body or "events" in body or body.get("Type") == "SubscriptionConfirmation"):
            body = _decode(body["Message"])
        elif isinstance(body, str):
            body = _decode(body)
        else:
            return body
    return body


def _decode(text: str) -> Any:
    try:
        return loads_bounded(text)
    except JsonTooDeep as exc:
        raise NotificationError(f"the message is {exc.message}") from None
    except json.JSONDecodeError:
        pass
    try:
        return loads_bounded(base64.b64decode(text, validate=True))
    except JsonTooDeep as exc:
        raise NotificationError(f"the message is {exc.message}") from None
    except (binascii.Error, ValueError) as exc:
        raise NotificationError("the message is neither JSON nor base64-encoded JSON") from exc


def _records(records: Any, scheme: str, section: str) -> Notification:
    where = "Records" if scheme == "s3" else "events"
    if not isinstance(records, list):
        raise NotificationError(f"`{where}` must be a list")
    out = Notification()
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise NotificationError(f"`{where}[{index}]` must be an object")
        name = _string(record, "eventName", f"{where}[{index}]") or ""
        found = _object(_section(record, section, f"{where}[{index}]"), f"{where}[{index}].{section}", scheme, name,
                        url_encoded=scheme == "s3")
        if found is None or not _created(name):
            out.ignored += 1
        else:
            out.objects.append(found)
    return out


def _cloud_event(event: dict[str, Any]) -> Notification:
    name = event["type"]
    data = event["data"]
    # EventBridge puts bucket and object in data.oss, or in data itself
    in_data = _object(data, "data", "oss", name, url_encoded=False)
    found = _object(_section(data, "oss", "data"), "data.oss", "oss", name, url_encoded=False) or in_data
    if found is None or not _created(name):
        return Notification(ignored=1)
    return Notification(objects=[found])


#: ObjectCreated events that do not mean a whole new object (OSS reports each step of a multipart upload).
_PARTIAL = frozenset({"InitiateMultipartUpload", "UploadPart", "UploadPartCopy"})


def _created(event_name: str) -> bool:
    """ObjectCreated:* in any vendor's spelling (s3:ObjectCreated:Put, oss:ObjectCreated:PutObject), not
    the steps of a multipart upload (only CompleteMultipartUpload makes the object)."""
    parts = event_name.split(":")
    return "ObjectCreated" in parts[:2] and parts[-1] not in _PARTIAL


#: What makes this write of an object unique, in order of preference (null or absent: the next one).
VERSION_FIELDS = ("versionId", "eTag", "etag", "sequencer")


def _object(section: dict[str, Any] | None, where: str, scheme: str, event: str, *,
            url_encoded: bool) -> StoredObject | None:
    """The object a record's section names; None when it names none (the record is then ignored)."""
    if section is None:
        return None
    bucket, obj = _section(section, "bucket", where), _section(section, "object", where)
    name = _string(bucket, "name", f"{where}.bucket", required=True) if bucket is not None else None
    key = _string(obj, "key", f"{where}.object", required=True) if obj is not None else None
    versions = [_string(obj, field_, f"{where}.object", nullable=True) for field_ in VERSION_FIELDS] if obj else []
    if not (name and key):
        return None
    if url_encoded:
        key = unquote_plus(key)  # S3 and MinIO send the key form-encoded: `+` is a space, %2B a plus
    version = next((value for value in versions if value not in (None, "", "null")), "")
    return StoredObject(scheme=scheme, bucket=name, key=key, version=version, event=event)


def _section(parent: dict[str, Any], name: str, where: str) -> dict[str, Any] | None:
    """parent[name] when it is an object; None when absent; refused when it is anything else (null too)."""
    if name not in parent:
        return None
    value = parent[name]
    if not isinstance(value, dict):
        raise NotificationError(f"`{where}.{name}` must be an object")
    return value


def _string(parent: dict[str, Any], name: str, where: str, *, nullable: bool = False,
            required: bool = False) -> str | None:
    """parent[name] when it is a string holding no NUL; None when absent (unless `required`) or null (where
    `nullable`); refused otherwise."""
    value = parent.get(name)
    if name not in parent and required:
        raise NotificationError(f"`{where}.{name}` is required")
    if name not in parent or (value is None and nullable):
        return None
    if not isinstance(value, str) or "\x00" in value:
        raise NotificationError(f"`{where}.{name}` must be a string without NUL")
    return value


# -- the request body's schema (POST /v1/webhooks/objects), for the OpenAPI document -------------------
def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_TEXT = {"type": "string", "pattern": NO_NUL}
#: A body whose `Message` is a string is an envelope (read from that string), not this shape.
_ENVELOPE = {"required": ["Message"], "properties": {"Message": {"type": "string"}}}
#: Every shape parse_notification reads, as named schemas: a body is accepted exactly when it is one of
#: them (or a list of them). SNS and MNS envelopes (the notification as JSON or base64 in a string
#: `Message`, or in MNS's XML) are read too, but no schema can say what a string must decode to: they are
#: described, not typed.
NOTIFICATION_SCHEMAS: dict[str, dict[str, Any]] = {
    "NotificationBucket": {"type": "object", "required": ["name"], "properties": {"name": _TEXT}},
    "NotificationObject": {"type": "object", "required": ["key"], "properties": {
        "key": _TEXT, **{name: {"anyOf": [_TEXT, {"type": "null"}]} for name in VERSION_FIELDS}}},
    "NotificationSection": {"type": "object", "description": "where the object is", "properties": {
        "bucket": _ref("NotificationBucket"), "object": _ref("NotificationObject")}},
    "S3Record": {"type": "object", "description": "a record of an S3 or MinIO notification (not a creation: ignored)",
                 "properties": {"eventName": {"type": "string"}, "s3": _ref("NotificationSection")}},
    "OssEvent": {"type": "object", "description": "an event of an OSS notification (not a creation: ignored)",
                 "properties": {"eventName": {"type": "string"}, "oss": _ref("NotificationSection")}},
    "S3Notification": {"type": "object", "required": ["Records"], "description": "S3 or MinIO",
                       "properties": {"Records": {"type": "array", "items": _ref("S3Record")}}},
    "OssNotification": {"type": "object", "required": ["events"], "description": "Alibaba OSS (through MNS)",
                        "properties": {"events": {"type": "array", "items": _ref("OssEvent")}},
                        "not": {"required": ["Records"]}},
    "OssCloudEvent": {
        "type": "object", "required": ["type", "data"], "description": "an Alibaba EventBridge OSS event",
        "properties": {"type": {"type": "string", "description": "oss:ObjectCreated:<how>; others are ignored"},
                       "data": {"type": "object", "properties": {
                           "oss": _ref("NotificationSection"), "bucket": _ref("NotificationBucket"),
                           "object": _ref("NotificationObject")}}},
        "not": {"anyOf": [{"required": ["Records"]}, {"required": ["events"]}, _ENVELOPE]}},
    "StoreCheck": {"type": "object", "description": "a store checking the endpoint (S3's test event, SNS asking "
                                                    "to be confirmed): acknowledged, nothing queued",
                   "anyOf": [{"required": ["Event"], "properties": {"Event": {"const": "s3:TestEvent"}},
                              "not": _ENVELOPE},
                             {"required": ["Type"], "properties": {"Type": {"const": "SubscriptionConfirmation"}}}]},
    "ObjectNotification": {"anyOf": [_ref("S3Notification"), _ref("OssNotification"), _ref("OssCloudEvent"),
                                     _ref("StoreCheck")]},
}
NOTIFICATION_BODY = {"anyOf": [_ref("ObjectNotification"), {"type": "array", "items": _ref("ObjectNotification")}]}
