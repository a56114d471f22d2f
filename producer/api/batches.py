"""/v1/batches: one question over many objects (README, Batches). Each route calls the service layer
(producer/service/batches.py) as the key's principal; another tenant's batch answers like a missing one.

| method + path | does |
|---|---|
| POST /v1/batches | a batch request -> 202 {"batch_id", "items", "created", "estimate"}; a dry run -> 200 {"items", "estimate"} |
| GET /v1/batches/{id} | its status and tally: counts by status, done, tokens, cost, rate, eta_s |
| GET /v1/batches/{id}/results | ?format=jsonl|csv: one line per finished item, in the batch's order, streamed |
| GET /v1/batches/{id}/events | batch.progress and batch.completed as Server-Sent Events (Last-Event-ID resumes) |
| POST /v1/batches/{id}/cancel | cancel the queued items, stop the running ones |
| POST /v1/batches/{id}/retry | queue the failed items again |
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse

from contracts import events as ev
from contracts.batches.follow import BatchFollow, afollow
from contracts.batches.progress import ENDED
from contracts.bus.sse import format_sse
from contracts.logging import get_logger
from contracts.tenants import Principal
from producer.api import schemas
from producer.api.bodies import bad_request, read_json
from producer.api.deps import Api, AppServices, Caller, Viewer
from producer.api.events import SSE_RETRY_MS, parse_last_event_id
from producer.api.responses import JSONResponse
from producer.service.batches import render_results

log = get_logger(__name__)
router = APIRouter(tags=["batches"])
errors = schemas.error_responses
BatchId = Annotated[str, Path(max_length=128)]
#: Whether the results are every item's (the batch ended) or the finished ones so far.
COMPLETE_HEADER = "X-Qvq-Batch-Complete"


@router.post("/batches", status_code=202, response_model=schemas.BatchCreated, responses={
    200: {"model": schemas.BatchDryRun, "description": "a dry run: counted and estimated, nothing queued"},
    **errors(400, 401, 403, 404, 409, 413, 415, 422, 503)},
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/BatchRequestBody"}}}}})
async def submit_batch(request: Request, api: Api, principal: Caller) -> JSONResponse:
    """Queue one task per object under `source` (or per ref of `items`), after estimating the cost."""
    body = await read_json(request, api.settings.max_request_bytes)
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object (a batch request)")
    answer = await api.run(api.services.batches.submit, principal, body)
    if answer.get("dry_run"):
        return JSONResponse(answer, status_code=200)
    log.info("batch.submitted", batch_id=answer["batch_id"], items=answer["items"], created=answer["created"])
    return JSONResponse(answer, status_code=202, headers={"Location": f"/v1/batches/{answer['batch_id']}"})


@router.get("/batches/{batch_id}", response_model=schemas.Batch, responses=errors(401, 404, 422, 503))
async def get_batch(batch_id: BatchId, api: Api, principal: Caller) -> dict[str, Any]:
    """The batch's status and tally (exact: counted from the items now)."""
    return await api.run(api.services.batches.view, principal, batch_id)


@router.get("/batches/{batch_id}/results", response_class=StreamingResponse, responses={
    200: {"description": f"one line per finished item, in the batch's order; `{COMPLETE_HEADER}: false` while "
                         "items are still queued or running",
          "content": {"application/x-ndjson": {"schema": {"type": "string"}}, "text/csv": {"schema": {"type": "string"}}}},
    **errors(401, 404, 422, 503)})
async def batch_results(batch_id: BatchId, api: Api, principal: Caller,
                        format: Annotated[Literal["jsonl", "csv"], Query()] = "jsonl") -> Response:
    """The batch's results, streamed: JSON Lines or CSV (header first)."""
    view = await api.run(api.services.batches.view, principal, batch_id)
    body = render_results(api.services.batches.results(principal, batch_id), format)
    media = "text/csv; charset=utf-8" if format == "csv" else "application/x-ndjson"
    complete = view["status"] in ENDED
    return StreamingResponse(body, media_type=media, headers={
        COMPLETE_HEADER: "true" if complete else "false",
        "Content-Disposition": f'inline; filename="{batch_id}.{format}"'})


@router.get("/batches/{batch_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "Server-Sent Events: `id: <seq>`, `event: batch.progress | batch.completed`",
          "content": schemas.event_stream(ev.BATCH_EVENT_TYPES)},
    **errors(400, 401, 404, 422, 503)})
async def batch_events(
    batch_id: BatchId, api: Api, principal: Viewer,
    from_seq: Annotated[int, Query(ge=0, description="only events after this seq")] = 0,
    last_event_id: Annotated[str, Header(json_schema_extra={"pattern": r"^\s*[0-9]{0,18}\s*$"})] = "",
) -> Response:
    """batch.progress (a few a second at most) and batch.completed, replayed then live; ends at the end."""
    record = await api.run(api.services.batches.get, principal, batch_id)
    state = BatchFollow(batch_id, from_seq=max(from_seq, parse_last_event_id(last_event_id)), round_=record.round)
    return StreamingResponse(_sse(api, principal, batch_id, state), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _sse(api: AppServices, principal: Principal, batch_id: str, state: BatchFollow) -> AsyncIterator[str]:
    yield f"retry: {SSE_RETRY_MS}\n\n"

    async def ended() -> bool:  # the log expires: the row tells whether the end already came
        view = await api.run(api.services.batches.view, principal, batch_id)
        if view["status"] not in ENDED or view["round"] < state.round:
            return False
        state.done = True
        return True

    events = afollow(api.aclient.redis, state, ended, block_s=min(api.keepalive_s, 5.0))
    try:
        async for event in events:
            yield ": keep-alive\n\n" if event is None else format_sse(event)
    except Exception:
        log.exception("sse.failed", batch_id=batch_id)
    finally:
        with anyio.move_on_after(5, shield=True):
            await events.aclose()  # type: ignore[attr-defined]


@router.post("/batches/{batch_id}/cancel", status_code=202, response_model=schemas.BatchCancelled,
             responses=errors(401, 404, 422, 503))
async def cancel_batch(batch_id: BatchId, api: Api, principal: Caller) -> JSONResponse:
    """Cancel the queued items and stop the running ones; nothing of the batch starts after this."""
    return JSONResponse(await api.run(api.services.batches.cancel, principal, batch_id), status_code=202)


@router.post("/batches/{batch_id}/retry", status_code=202, response_model=schemas.BatchRetried,
             responses=errors(401, 404, 422, 503))
async def retry_batch(batch_id: BatchId, api: Api, principal: Caller) -> JSONResponse:
    """Queue the failed items again (each a new run); the batch completes, and calls back, again."""
    return JSONResponse(await api.run(api.services.batches.retry, principal, batch_id), status_code=202)
