"""Inbound webhooks: signed job requests, and object-created notifications that trigger analyses.

| method + path | does |
|---|---|
| POST /v1/webhooks/jobs | a job request signed with X-Qvq-Signature -> 202 {"task_id", "created"} |
| POST /v1/webhooks/objects | an S3, MinIO or OSS notification (API key) -> 202 {"tasks": [...], "ignored": N} |

Who owns a signed job: `QVQ_WEBHOOK_SECRET` is an admin-level secret (its holder may name any tenant in
the body, as an admin key may); a secret of `QVQ_WEBHOOK_SECRETS` (`tenant:secret,...`) binds the job
to its tenant (a body naming another tenant -> 403). A body without `idempotency_key` gets one derived
from its signature, so a replay within the 5-minute window returns the first task.

Object notifications act as the API key's tenant. Each created object matching a rule of QVQ_TRIGGERS
becomes one task, its idempotency key derived from (scheme, bucket, key, version): the same object
version notified again, or to another API process, returns the same task. A rule bound to another
tenant than the key's refuses the whole notification (403), nothing enqueued.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
from typing import Any

from fastapi import APIRouter, Request

from contracts.errors import AuthError, JsonTooDeep, NotificationError
from contracts.json_shape import loads_bounded
from contracts.logging import get_logger
from contracts.tenants import Principal
from contracts.text import check_text
from contracts.triggers import TriggerRule, first_match
from contracts.webhook import SIGNATURE_HEADER, verified_digest
from producer.api import schemas
from producer.api.bodies import bad_request, limited_stream, media_type, parse_json, too_large, unsupported
from producer.api.deps import Api, AppServices, Viewer
from producer.api.notifications import NOTIFICATION_BODY, StoredObject, parse_notification
from producer.api.responses import JSONResponse
from producer.api.tasks import created_response, request_trace

log = get_logger(__name__)
MNS_MESSAGE = re.compile(rb"<Message>(.*?)</Message>", re.DOTALL)


router = APIRouter(tags=["webhooks"])
errors = schemas.error_responses


# -- signed job requests -----------------------------------------------------------------------
@router.post("/webhooks/jobs", status_code=202, response_model=schemas.TaskCreated,
             responses=errors(400, 401, 403, 413, 415, 422, 503),
             openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                 "schema": {"$ref": "#/components/schemas/JobRequestBody"}}}}})
async def job_webhook(request: Request, api: Api) -> JSONResponse:
    """A job request signed like callbacks; a bad or stale signature -> 401, nothing enqueued."""
    if media_type(request) != "application/json":
        raise unsupported("send the job as JSON with Content-Type: application/json")
    raw = await _read(request, api.settings.max_request_bytes)
    principal, digest = _signer(api, raw, request.headers.get(SIGNATURE_HEADER, ""))
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object (a job request)")
    if "idempotency_key" not in body:  # a replay of the same signed request returns the same task
        body["idempotency_key"] = "webhook:" + digest[:40]  # the verified digest, never the raw header
    response = created_response(await api.run(api.services.tasks.submit, principal, body,
                                              trace=request_trace(request)))
    response.status_code = 202
    return response


def _signer(api: AppServices, raw: bytes, signature: str) -> tuple[Principal, str]:
    """Who signed (the admin-level secret, or one tenant's) and the digest that verified; 401 when none
    verifies, or the header is not exactly `t=<unix>,v1=<hex>[,v1=<hex>...]`."""
    settings = api.settings
    if not signature:
        raise AuthError(f"sign the body: {SIGNATURE_HEADER}: t=<unix>,v1=<hex HMAC-SHA256>", code="auth.required")
    candidates: list[tuple[str | None, str]] = [(None, settings.webhook_secret)] if settings.webhook_secret else []
    candidates += list(settings.tenant_webhook_secrets.items())
    verified = [(tenant, verified_digest(raw, signature, secret)) for tenant, secret in candidates]  # every one
    matched = [(tenant, digest) for tenant, digest in verified if digest is not None]
    if not matched:
        log.warning("webhook.refused", reason="signature")
        raise AuthError("the signature is not valid, or its timestamp is not within 5 minutes", code="auth.invalid")
    tenant, digest = matched[0]
    return Principal(tenant=tenant), digest


async def _read(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in limited_stream(request, limit)])


# -- object notifications ----------------------------------------------------------------------
@router.post("/webhooks/objects", status_code=202, responses=errors(400, 401, 403, 413, 422, 503),
             openapi_extra={"requestBody": {"required": True, "description": (
                 "an S3/MinIO bucket notification (Records[]), an Alibaba OSS event notification "
                 "(events[], plain, base64 or in its MNS envelope) or an EventBridge CloudEvent"),
                 "content": {"application/json": {"schema": NOTIFICATION_BODY}}}})
async def object_webhook(request: Request, api: Api, principal: Viewer) -> JSONResponse:
    """Object-created notifications (S3, MinIO, OSS via MNS or EventBridge) -> one task per new object."""
    try:
        body = _decode_body(await _read(request, api.settings.max_request_bytes))
        if isinstance(body, dict) and body.get("Type") == "SubscriptionConfirmation":  # never fetched by us
            log.warning("webhook.sns_confirmation", topic=str(body.get("TopicArn"))[:300],
                        subscribe_url=str(body.get("SubscribeURL"))[:1000])
        notification = parse_notification(body)
    except NotificationError as exc:
        raise bad_request(exc.message) from None
    limit = api.settings.max_notification_records
    if len(notification.objects) + notification.ignored > limit:
        raise too_large(limit, what=f"{len(notification.objects) + notification.ignored:,} records",
                        setting="QVQ_MAX_NOTIFICATION_RECORDS")
    for index, obj in enumerate(notification.objects):  # refused whole, before anything is enqueued
        check_text(obj.key, f"objects[{index}].key")
        check_text(obj.version, f"objects[{index}].version")
    rules = api.settings.trigger_rules
    matched: list[tuple[StoredObject, TriggerRule]] = []
    ignored = notification.ignored
    for obj in notification.objects:
        rule = first_match(rules, obj.bucket, obj.key)
        if rule is None:
            ignored += 1
            continue
        if not principal.is_admin and rule.tenant not in (None, principal.tenant):
            log.warning("webhook.refused", reason="rule_tenant", bucket=obj.bucket)
            raise AuthError(f"a trigger rule for bucket {obj.bucket!r} belongs to another tenant than this "
                            "key's; nothing was enqueued", code="auth.forbidden", status=403)
        matched.append((obj, rule))
    tasks = [await _trigger(api, principal, obj, rule) for obj, rule in matched]
    log.info("webhook.objects", tasks=len(tasks), created=sum(t["created"] for t in tasks), ignored=ignored)
    return JSONResponse({"tasks": tasks, "ignored": ignored}, status_code=202)


def _decode_body(raw: bytes) -> Any:
    """JSON, or an MNS XML envelope whose <Message> holds it (plain or base64)."""
    text = raw.strip()
    if text.startswith(b"<"):
        found = MNS_MESSAGE.search(text)
        if found is None:
            raise bad_request("an XML body must be an MNS notification with a <Message>")
        return html.unescape(found.group(1).decode("utf-8", "replace")).strip()
    try:
        decoded = loads_bounded(text)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return text.decode("ascii", "replace")  # maybe base64: parse_notification decodes it
    except JsonTooDeep as exc:
        raise bad_request(f"the body is {exc.message}") from None
    if not isinstance(decoded, dict | list):  # a notification is a JSON object or a list of them
        raise bad_request("expected an object-store notification (a JSON object, or a list of them)")
    return decoded


async def _trigger(api: AppServices, principal: Principal, obj: StoredObject, rule: TriggerRule) -> dict[str, Any]:
    tenant = principal.tenant if principal.tenant is not None else rule.tenant
    identity = "\0".join((tenant or "", obj.scheme, obj.bucket, obj.key, obj.version))
    body: dict[str, Any] = {
        **rule.job_fields(), "images": [obj.ref],
        "idempotency_key": "object:" + hashlib.sha256(identity.encode()).hexdigest()[:48],
        "metadata": {"trigger": {"bucket": obj.bucket, "key": obj.key, "version": obj.version, "event": obj.event}},
    }
    if tenant is not None:
        body["tenant"] = tenant
    submitted = await api.run(api.services.tasks.submit, principal, body)
    log.info("task.submitted", task_id=submitted.record.id, tenant=submitted.record.tenant,
             created=submitted.created, trigger="object")
    return {"task_id": submitted.record.id, "ref": obj.ref, "created": submitted.created}
