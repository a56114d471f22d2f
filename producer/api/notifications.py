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
    """The created objects of a notification body (already JSON-decoded)."""
    body = _unwrap(body)
    if isinstance(body, list):
        out = Notification()
        for item in body:
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
    if not isinstance(records, list):
        raise NotificationError(f"`{'Records' if scheme == 's3' else 'events'}` must be a list")
    out = Notification()
    for record in records:
        name = str(record.get("eventName", "")) if isinstance(record, dict) else ""
        found = _object(record.get(section), scheme, name, url_encoded=scheme == "s3") if _created(name) else None
        if found is None:
            out.ignored += 1
        else:
            out.objects.append(found)
    return out


def _cloud_event(event: dict[str, Any]) -> Notification:
    name = event["type"]
    data = event["data"]
    section = data.get("oss") if isinstance(data.get("oss"), dict) else data
    found = _object(section, "oss", name, url_encoded=False) if _created(name) else None
    return Notification(objects=[found] if found else [], ignored=0 if found else 1)


#: ObjectCreated events that do not mean a whole new object (OSS reports each step of a multipart upload).
_PARTIAL = frozenset({"InitiateMultipartUpload", "UploadPart", "UploadPartCopy"})


def _created(event_name: str) -> bool:
    """ObjectCreated:* in any vendor's spelling (s3:ObjectCreated:Put, oss:ObjectCreated:PutObject), not
    the steps of a multipart upload (only CompleteMultipartUpload makes the object)."""
    parts = event_name.split(":")
    return "ObjectCreated" in parts[:2] and parts[-1] not in _PARTIAL


def _object(section: Any, scheme: str, event: str, *, url_encoded: bool) -> StoredObject | None:
    if not isinstance(section, dict):
        return None
    bucket, obj = section.get("bucket"), section.get("object")
    if not (isinstance(bucket, dict) and isinstance(obj, dict)):
        return None
    name, key = bucket.get("name"), obj.get("key")
    if not (isinstance(name, str) and name and isinstance(key, str) and key):
        return None
    if url_encoded:
        key = unquote_plus(key)  # S3 and MinIO send the key form-encoded: `+` is a space, %2B a plus
    version = next((str(obj[name_]) for name_ in ("versionId", "eTag", "etag", "sequencer")
                    if obj.get(name_) not in (None, "", "null")), "")
    return StoredObject(scheme=scheme, bucket=name, key=key, version=version, event=event)
