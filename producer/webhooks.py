"""Inbound webhooks: signed job requests, and object-created notifications that trigger analyses.

| method + path | does |
|---|---|
| POST /v1/webhooks/jobs | a job request signed with X-Qvq-Signature -> 202 {"task_id", "created"} |
| POST /v1/webhooks/objects | an S3, MinIO or OSS notification (API key) -> 202 {"tasks": [...], "ignored": N} |
| POST /v1/tasks/{id}/callback/redeliver | send the task's callback again -> 202 the delivery |

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
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from contracts import callbacks as cb
from contracts.logging import get_logger
from contracts.tenants import Principal
from contracts.triggers import TriggerRule, first_match
from contracts.webhook import SIGNATURE_HEADER, verify
from producer import schemas
from producer.api import Caller, Services, _record, _services, _submit, viewer
from producer.http import ApiError, limited_stream
from producer.notifications import NotificationError, StoredObject, parse_notification

log = get_logger(__name__)
MNS_MESSAGE = re.compile(rb"<Message>(.*?)</Message>", re.DOTALL)


def router() -> APIRouter:
    routes = APIRouter()
    errors = schemas.error_responses
    routes.add_api_route("/webhooks/jobs", job_webhook, methods=["POST"], status_code=202,
                         response_model=schemas.TaskCreated, responses=errors(400, 401, 403, 413, 415, 422, 503),
                         openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                             "schema": {"$ref": "#/components/schemas/JobRequestBody"}}}}})
    routes.add_api_route("/webhooks/objects", object_webhook, methods=["POST"], status_code=202,
                         responses=errors(400, 401, 403, 413, 422, 503),
                         openapi_extra={"requestBody": {"required": True, "description": (
                             "an S3/MinIO bucket notification (Records[]), an Alibaba OSS event notification "
                             "(events[], plain, base64 or in its MNS envelope) or an EventBridge CloudEvent"),
                             "content": {"application/json": {"schema": {"type": ["object", "array"]}}}}})
    routes.add_api_route("/tasks/{task_id}/callback/redeliver", redeliver_callback, methods=["POST"],
                         status_code=202, responses=errors(401, 404, 503))
    return routes


# -- signed job requests -----------------------------------------------------------------------
async def job_webhook(request: Request) -> JSONResponse:
    """A job request signed like callbacks; a bad or stale signature -> 401, nothing enqueued."""
    services = _services(request)
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(415, "request.unsupported_media_type", "send the job as JSON with "
                       "Content-Type: application/json")
    raw = await _read(request, services.settings.max_request_bytes)
    signature = request.headers.get(SIGNATURE_HEADER, "")
    principal = _signer(services, raw, signature)
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ApiError(400, "request.invalid", "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request.invalid", "the body must be a JSON object (a job request)")
    if "idempotency_key" not in body:  # a replay of the same signed request returns the same task
        body["idempotency_key"] = "webhook:" + signature.rpartition("v1=")[2][:40]
    response = await _submit(services, principal, body)
    response.status_code = 202
    return response


def _signer(services: Services, raw: bytes, signature: str) -> Principal:
    """Who signed: the admin-level secret, or one tenant's; 401 when none verifies."""
    settings = services.settings
    if not signature:
        raise ApiError(401, "auth.required", f"sign the body: {SIGNATURE_HEADER}: t=<unix>,v1=<hex HMAC-SHA256>")
    candidates: list[tuple[str | None, str]] = [(None, settings.webhook_secret)] if settings.webhook_secret else []
    candidates += list(settings.tenant_webhook_secrets.items())
    matched = [tenant for tenant, secret in candidates if verify(raw, signature, secret)]  # every one is tried
    if not matched:
        log.warning("webhook.refused", reason="signature")
        raise ApiError(401, "auth.invalid", "the signature is not valid, or its timestamp is not within 5 minutes")
    return Principal(tenant=matched[0])


async def _read(request: Request, limit: int) -> bytes:
    return b"".join([chunk async for chunk in limited_stream(request, limit)])


# -- object notifications ----------------------------------------------------------------------
async def object_webhook(request: Request, principal: Annotated[Principal, Depends(viewer)]) -> JSONResponse:
    """Object-created notifications (S3, MinIO, OSS via MNS or EventBridge) -> one task per new object."""
    services = _services(request)
    try:
        body = _decode_body(await _read(request, services.settings.max_request_bytes))
        if isinstance(body, dict) and body.get("Type") == "SubscriptionConfirmation":  # never fetched by us
            log.warning("webhook.sns_confirmation", topic=str(body.get("TopicArn"))[:300],
                        subscribe_url=str(body.get("SubscribeURL"))[:1000])
        notification = parse_notification(body)
    except NotificationError as exc:
        raise ApiError(400, "request.invalid", str(exc)) from None
    rules = services.settings.trigger_rules
    matched: list[tuple[StoredObject, TriggerRule]] = []
    ignored = notification.ignored
    for obj in notification.objects:
        rule = first_match(rules, obj.bucket, obj.key)
        if rule is None:
            ignored += 1
            continue
        if not principal.is_admin and rule.tenant not in (None, principal.tenant):
            log.warning("webhook.refused", reason="rule_tenant", bucket=obj.bucket)
            raise ApiError(403, "auth.forbidden", f"a trigger rule for bucket {obj.bucket!r} belongs to another "
                           "tenant than this key's; nothing was enqueued")
        matched.append((obj, rule))
    tasks = [await _trigger(services, principal, obj, rule) for obj, rule in matched]
    log.info("webhook.objects", tasks=len(tasks), created=sum(t["created"] for t in tasks), ignored=ignored)
    return JSONResponse({"tasks": tasks, "ignored": ignored}, status_code=202)


def _decode_body(raw: bytes) -> Any:
    """JSON, or an MNS XML envelope whose <Message> holds it (plain or base64)."""
    text = raw.strip()
    if text.startswith(b"<"):
        found = MNS_MESSAGE.search(text)
        if found is None:
            raise ApiError(400, "request.invalid", "an XML body must be an MNS notification with a <Message>")
        return html.unescape(found.group(1).decode("utf-8", "replace")).strip()
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return text.decode("ascii", "replace")  # maybe base64: parse_notification decodes it


async def _trigger(services: Services, principal: Principal, obj: StoredObject, rule: TriggerRule) -> dict[str, Any]:
    tenant = principal.tenant if principal.tenant is not None else rule.tenant
    identity = "\0".join((tenant or "", obj.scheme, obj.bucket, obj.key, obj.version))
    body: dict[str, Any] = {
        **rule.job_fields(), "images": [obj.ref],
        "idempotency_key": "object:" + hashlib.sha256(identity.encode()).hexdigest()[:48],
        "metadata": {"trigger": {"bucket": obj.bucket, "key": obj.key, "version": obj.version, "event": obj.event}},
    }
    if tenant is not None:
        body["tenant"] = tenant
    response = await _submit(services, principal, body)
    created = json.loads(bytes(response.body))
    return {"task_id": created["task_id"], "ref": obj.ref, "created": created["created"]}


# -- callbacks ---------------------------------------------------------------------------------
async def redeliver_callback(task_id: str, request: Request, principal: Caller) -> JSONResponse:
    """Send the task's callback again now (a fresh retry window)."""
    services = _services(request)
    await _record(services, principal, task_id)
    delivery = await run_in_threadpool(redeliver, services, task_id)
    if delivery is None:
        raise ApiError(404, "task.not_found", f"task {task_id!r} has no callback to deliver", field="task_id")
    return JSONResponse(delivery, status_code=202)


def redeliver(services: Services, task_id: str) -> dict[str, Any] | None:
    record = services.client.store.redeliver_callback(task_id)
    if record is None:
        return None
    try:
        services.client.celery.send_task(cb.TASK_NAME, args=[record.event_id], queue=cb.QUEUE, serializer="json")
    except Exception as exc:  # the row is due now: a worker's sweep sends it
        log.warning("callback.redeliver_enqueue_failed", error=type(exc).__name__)
    return record.to_dict()
