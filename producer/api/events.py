"""GET /v1/tasks/{id}/events: a task's events as Server-Sent Events, replayed then live, resumable
(Last-Event-ID or ?from_seq=), ending after the terminal event of its latest run.

Each stream is a coroutine on the API's event loop, never a thread: live messages come from the process's
one pub/sub connection (fanout.py) and the viewers of a task share their row reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Header, Query
from fastapi.responses import Response, StreamingResponse

from contracts import events as ev
from contracts.bus import RECONNECTABLE
from contracts.bus.sse import format_sse
from contracts.errors import ApiCallError
from contracts.logging import get_logger
from producer.aio import AsyncClient
from producer.api import schemas
from producer.api.bodies import bad_request
from producer.api.deps import Api, Viewer
from producer.api.fanout import FanoutHub

log = get_logger(__name__)
router = APIRouter(tags=["tasks"])
KEEPALIVE_S = 15.0
SSE_RETRY_MS = 3000  # how long a browser waits before reconnecting a dropped stream


@router.get("/tasks/{task_id}/events", response_class=StreamingResponse, responses={
    200: {"description": "Server-Sent Events: `id: <seq>`, `event: <type>`, `data: <event JSON>`",
          "content": schemas.event_stream(ev.EVENT_TYPES)},
    204: {"description": "the task had already ended before Last-Event-ID: nothing more will come"},
    **schemas.error_responses(400, 401, 404, 410, 422, 503)})
async def task_events(
    task_id: str, api: Api, principal: Viewer,
    from_seq: Annotated[int, Query(ge=0, description="only events after this seq")] = 0,
    last_event_id: Annotated[str, Header(json_schema_extra={"pattern": r"^\s*[0-9]{0,18}\s*$"})] = "",  # 400, ours
) -> Response:
    """Server-Sent Events: the log replayed after max(from_seq, Last-Event-ID), then live."""
    record = await api.run(api.services.tasks.get, principal, task_id)
    start = max(from_seq, parse_last_event_id(last_event_id))
    try:  # on the hub's bounded pool: viewers come by the thousand
        last, known = await api.fanout.bus.last_event(task_id), True
    except RECONNECTABLE:  # Redis is away: the stream waits for it, or ends with the row's outcome
        last, known = None, False
    if known and last is None and record.is_terminal:
        raise ApiCallError(f"the events of task {task_id} have expired (QVQ_EVENT_TTL_S); "
                           f"GET /v1/tasks/{task_id} has its result", code="events.expired", status=410)
    if last is not None and ev.is_terminal(last) and start >= last["seq"]:
        return Response(status_code=204)  # nothing more will come; tells EventSource to stop
    return StreamingResponse(
        sse_stream(api.aclient, task_id, start, api.keepalive_s, hub=api.fanout),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"},
    )


async def sse_stream(aclient: AsyncClient, task_id: str, from_seq: int,
                     keepalive_s: float = KEEPALIVE_S, *, hub: FanoutHub | None = None) -> AsyncIterator[str]:
    """The task's events as SSE frames, a keep-alive comment after each `keepalive_s` without an event,
    ending after the terminal event of the task's latest run (made from the row when it never reached
    Redis; the row is read while quiet).

    With `hub`, live messages come from the process's one pub/sub connection and the viewers of a task
    share their row reads; without it, the stream has a connection of its own."""
    yield f"retry: {SSE_RETRY_MS}\n\n"
    # The subscription itself says when keepalive_s passed without an event (None): no timed wait
    # around each event, which thousands of viewers would pay for on every event.
    if hub is None:
        events = aclient.bus.heartbeats(task_id, from_seq, heartbeat_s=keepalive_s, row=aclient.row)
    else:
        events = hub.heartbeats(task_id, from_seq, heartbeat_s=keepalive_s, row=hub.row_reader(aclient.row))
    try:
        # No return at a terminal event: an earlier run's is followed by the next run; the
        # subscription ends after the latest run's.
        async for event in events:
            if event is None:
                yield ": keep-alive\n\n"
            else:
                yield format_sse(event) if hub is None else hub.frame(event, format_sse)
    except Exception:
        log.exception("sse.failed", task_id=task_id)  # the client reconnects with Last-Event-ID
    finally:
        # Runs on a client disconnect too (the request is cancelled): release the subscription.
        with anyio.move_on_after(5, shield=True):
            await events.aclose()


def parse_last_event_id(value: str | None) -> int:
    if not value or not value.strip():
        return 0
    if not value.strip().isascii() or not value.strip().isdigit() or len(value.strip()) > 18:
        raise bad_request("Last-Event-ID must be a seq (a whole number)", field="Last-Event-ID")
    return int(value.strip())
