"""/v1/tasks: submit, list, read, cancel and retry tasks, and check a conversation. Each route reads its
request, calls the service layer (producer/service/tasks.py) as the key's principal, and writes the answer.

| method + path | does |
|---|---|
| POST /v1/tasks | a JSON job request -> 202 {"task_id", "created"} (200 when an idempotency key returned an earlier task) |
| GET /v1/tasks | the caller's tasks, newest first: ?status=&since=&limit=&cursor= (&tenant= for admin keys) |
| GET /v1/tasks/{id} | the task's record, with its callback delivery and, while held back, `waiting` |
| POST /v1/tasks/{id}/cancel | stop a queued or running task |
| POST /v1/tasks/{id}/retry | queue a failed or cancelled task again -> 202 {"task_id", "from_seq"} |
| POST /v1/tasks/{id}/callback/redeliver | send the task's callback again -> 202 the delivery |
| GET /v1/conversations/{id} | 200 when the caller's tenant has this conversation, else 404 |
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Request

from contracts import tracing
from contracts.errors import RequestError
from contracts.logging import get_logger
from contracts.store import TaskRecord
from producer.api import schemas
from producer.api.bodies import bad_request, invalid, read_json
from producer.api.deps import Api, Caller
from producer.api.responses import JSONResponse
from producer.moments import parse_iso
from producer.service.tasks import Submitted

log = get_logger(__name__)
router = APIRouter(tags=["tasks"])
errors = schemas.error_responses
TaskId = Annotated[str, Path()]


def request_trace(request: Request) -> tracing.Carrier | None:
    """The trace a submit carries into its task: the API's own span (tracing on), else the caller's headers."""
    return tracing.current() or tracing.carrier(request.headers)


def created_response(submitted: Submitted) -> JSONResponse:
    """202 with the new task (200 when an idempotency key returned an earlier one)."""
    task_id = submitted.record.id
    log.info("task.submitted", task_id=task_id, tenant=submitted.record.tenant, created=submitted.created)
    return JSONResponse({"task_id": task_id, "created": submitted.created},
                        status_code=202 if submitted.created else 200, headers={"Location": f"/v1/tasks/{task_id}"})


@router.post("/tasks", status_code=202, response_model=schemas.TaskCreated, responses={
    200: {"model": schemas.TaskCreated, "description": "an idempotency key returned an earlier task"},
    **errors(400, 401, 403, 404, 409, 413, 415, 422, 503)},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/JobRequestBody"}}}}})
async def submit_task(request: Request, api: Api, principal: Caller) -> JSONResponse:
    """Enqueue a job request (JSON, README "Job request")."""
    body = await read_json(request, api.settings.max_request_bytes)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object (a job request)")
    return created_response(await api.run(api.services.tasks.submit, principal, body, trace=request_trace(request)))


@router.get("/tasks", response_model=schemas.TaskList, responses=errors(400, 401, 403, 422, 503))
async def list_tasks(
    api: Api, principal: Caller,
    status: Annotated[schemas.ListedStatus | None, Query(description="`waiting`: queued or running tasks "
                                                                     "that flow control holds back")] = None,
    tenant: Annotated[str | None, Query(pattern=schemas.SAFE_ID_PATTERN, description="admin keys only")] = None,
    since: Annotated[str | None, Query(description="created at or after; " + schemas.DATETIME_DESCRIPTION,
                                       json_schema_extra={"format": "date-time"})] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(pattern=schemas.CURSOR_PATTERN,
                                        description="the `next_cursor` of the page before")] = None,
) -> dict[str, Any]:
    """The caller's tasks, newest first, a page at a time."""
    records: list[TaskRecord] = await api.run(
        api.services.tasks.tasks, principal, status=status, since=query_moment(since, "since"), limit=limit + 1,
        tenant=tenant, before=_decode_cursor(cursor))
    page, more = records[:limit], len(records) > limit
    return {"tasks": [record.summary() for record in page],
            "next_cursor": _encode_cursor(page[-1]) if more and page else None}


@router.get("/tasks/{task_id}", response_model=schemas.TaskRecord, responses=errors(401, 404, 422, 503))
async def get_task(task_id: TaskId, api: Api, principal: Caller) -> dict[str, Any]:
    """The task's record, with its callback delivery (`callback`, null without one) and, while flow
    control holds it back, `waiting`: {reason, wait_s, since}."""
    return await api.run(api.services.tasks.view, principal, task_id)


@router.post("/tasks/{task_id}/cancel", status_code=202, response_model=schemas.CancelResult, responses={
    200: {"model": schemas.CancelResult, "description": "it had already ended"}, **errors(401, 404, 422, 503)})
async def cancel_task(task_id: TaskId, api: Api, principal: Caller) -> JSONResponse:
    """Stop a queued or running task (202), or say it had already finished (200)."""
    requested = await api.run(api.services.tasks.cancel, principal, task_id)
    record = await api.run(api.services.tasks.get, principal, task_id)
    return JSONResponse({"task_id": task_id, "cancel_requested": requested, "status": record.status},
                        status_code=202 if requested else 200)


@router.post("/tasks/{task_id}/retry", status_code=202, response_model=schemas.RetryResult,
             responses=errors(401, 404, 409, 422, 503))
async def retry_task(task_id: TaskId, api: Api, principal: Caller) -> JSONResponse:
    """Queue a failed or cancelled task again (same id, a new run); 409 for any other status.

    `from_seq` is where its events continue: GET .../events?from_seq=<it>."""
    from_seq = await api.run(api.services.tasks.retry, principal, task_id)
    return JSONResponse({"task_id": task_id, "from_seq": from_seq}, status_code=202)


@router.post("/tasks/{task_id}/callback/redeliver", status_code=202, responses=errors(401, 404, 409, 503))
async def redeliver_callback(task_id: TaskId, api: Api, principal: Caller) -> JSONResponse:
    """Send the task's callback again now (a fresh retry window)."""
    return JSONResponse(await api.run(api.services.callbacks.redeliver, principal, task_id), status_code=202)


@router.get("/conversations/{conversation_id}", response_model=schemas.Conversation,
            responses=errors(401, 404, 422, 503))
async def get_conversation(conversation_id: Annotated[str, Path(pattern=schemas.SAFE_ID_PATTERN)], api: Api,
                           principal: Caller) -> dict[str, Any]:
    """Whether the caller's tenant has this conversation (another tenant's answers like a missing one)."""
    if not await api.run(api.services.tasks.conversation_exists, principal, conversation_id):
        raise RequestError(f"no conversation {conversation_id!r}", field="conversation_id",
                           code="conversation.not_found")
    return {"conversation_id": conversation_id}


# -- query parameters --------------------------------------------------------------------------
def query_moment(value: str | None, field: str) -> dt.datetime | None:
    """An RFC 3339 date-time query parameter (a bare number is refused, not taken as a timestamp)."""
    if value is None:
        return None
    try:
        return parse_iso(value)
    except ValueError:
        raise invalid("expected a date-time like 2026-12-01T00:00:00Z", field=field) from None


_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MICROSECOND = dt.timedelta(microseconds=1)


def _encode_cursor(record: TaskRecord) -> str:
    """A page's end as `<created_at in Unix microseconds>-<task id>`: a position in the listing's order,
    so every cursor the pattern allows is one to read on from (and shows nothing another listing would not)."""
    created = record.created_at if record.created_at.tzinfo else record.created_at.replace(tzinfo=dt.UTC)
    return f"{(created - _EPOCH) // _MICROSECOND}-{record.id}"  # exact: no float on the way


def _decode_cursor(cursor: str | None) -> tuple[dt.datetime, str] | None:
    if not cursor:
        return None
    micros, _, task_id = cursor.partition("-")
    return _EPOCH + int(micros) * _MICROSECOND, task_id
