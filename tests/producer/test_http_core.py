"""The HTTP client's I/O-free core: SSE parsing, error mapping, where a followed stream resumes."""

from __future__ import annotations

import pytest

from contracts.bus.sse import format_sse
from contracts.errors import (
    ApiCallError,
    AuthError,
    ConflictError,
    NotFoundError,
    RequestError,
    UnavailableError,
)
from producer.http_client.core import Core, Follow, task_path
from producer.wire import error_from


def test_sse_frames_become_events_and_comments_are_skipped() -> None:
    state = Follow("t", 0, None, None)
    stream = (b"retry: 3000\n\n: keep-alive\n\nid: 1\nevent: task.queued\n"
              b'data: {"seq":1,"type":"task.queued"}\n\nid: 2\ndata: {"seq":2,\ndata: "type":"x"}\n\n')
    assert [event for byte in range(len(stream)) for event in state.feed(stream[byte:byte + 1])] == [
        {"seq": 1, "type": "task.queued"}, {"seq": 2, "type": "x"}]


def test_text_with_unicode_line_breaks_arrives_whole() -> None:
    """U+2028, U+2029 and U+0085 are line breaks to str.splitlines (and httpx's iter_lines), not to SSE."""
    event = {"seq": 1, "type": "answer.delta", "text": "one\u2028two\u2029three\x85four\x1cfive"}
    frame = format_sse(event).encode()
    assert b"\xe2\x80\xa8" in frame  # U+2028 travels raw, as JSON allows
    assert Follow("t", 0, None, None).feed(frame) == [event]


def test_a_resumed_stream_drops_what_it_already_gave_and_ends_after_the_terminal_event() -> None:
    state = Follow("t", 0, None, None)
    assert state.accept({"seq": 1, "type": "task.queued"}) and state.accept({"seq": 2, "type": "task.started"})
    assert not state.accept({"seq": 2, "type": "task.started"})  # replayed after a reconnect
    assert Core.events("t", state.last).headers["Last-Event-ID"] == "2"
    assert not state.ended(200)
    assert state.accept({"seq": 3, "type": "task.completed"}) and state.ended(200)
    assert Follow("t", 5, None, None).ended(204)


def test_reconnects_without_progress_give_up_with_one_clear_error() -> None:
    state = Follow("t", 0, None, None)
    delays = [state.next_delay() for _ in range(5)]
    assert delays == sorted(delays)
    with pytest.raises(UnavailableError, match="kept dropping"):
        state.next_delay()
    with pytest.raises(TimeoutError):
        Follow("t", 0, 0.0, None).check_time()


@pytest.mark.parametrize(("status", "code", "kind"), [
    (422, "request.invalid", RequestError), (409, "request.invalid", ConflictError),
    (422, "model.unknown", RequestError), (401, "auth.invalid", AuthError), (403, "auth.forbidden", AuthError),
    (404, "task.not_found", NotFoundError), (503, "unavailable", UnavailableError), (410, "events.expired", ApiCallError),
    (500, "internal", ApiCallError), (502, None, ApiCallError),
])
def test_error_answers_map_into_the_error_tree(status: int, code: str | None, kind: type) -> None:
    body = {"error": {"code": code, "message": "model: unknown model 'x'", "field": "model"}} if code else None
    error = error_from(status, body)
    assert type(error) is kind
    if code is not None:
        assert error.code == code  # type: ignore[attr-defined]
        assert str(error) == "model: unknown model 'x'"
    if kind is NotFoundError:
        assert isinstance(error, KeyError)


def test_a_task_id_is_escaped_into_one_path_segment() -> None:
    assert task_path("a/../b?x#y", "/cancel") == "/v1/tasks/a%2F..%2Fb%3Fx%23y/cancel"
