"""worker.sse (the lean stream reader) through QvqModel against the emulator over HTTP, and the SSE
framing cases the emulator does not produce, on a mock transport."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from contracts.errors import ModelError
from contracts.settings import Settings
from worker.model import QvqModel
from worker.sse import ChunkStream


def _model(url: str, **overrides: Any) -> QvqModel:
    return QvqModel(Settings(base_url=url, worker_concurrency=4, **overrides))


def _stream(model: QvqModel, prompt: str) -> Any:
    parts: list[tuple[str, str]] = []
    result = model.stream(model="qvq-max", messages=[{"role": "user", "content": prompt}], high_resolution=False,
                          attempt=1, on_text=lambda kind, text: parts.append((kind, text)))
    return result, parts


def test_streams_text_and_usage_like_the_sdk(emulator: Any) -> None:
    model = _model(emulator.url)
    try:
        result, parts = _stream(model, "[[emulator: reasoning_tokens=30 answer_tokens=10]] Hello there.")
    finally:
        model.close()
    assert result.finish_reason == "stop"
    assert result.reasoning == "".join(t for k, t in parts if k == "reasoning") and result.reasoning
    assert result.answer == "".join(t for k, t in parts if k == "answer") and result.answer
    assert result.usage["completion_tokens"] >= 40 and result.usage["total_tokens"] > result.usage["prompt_tokens"]
    assert None not in result.usage.values()


@pytest.mark.parametrize(("fault", "code", "retryable"), [
    ("429", "model.rate_limited", True), ("503", "model.unavailable", True), ("400", "model.rejected", False),
    ("cut:5", "model.stream_broken", True),
])
def test_errors_map_as_with_the_sdk_stream(emulator: Any, fault: str, code: str, retryable: bool) -> None:
    model = _model(emulator.url)
    try:
        with pytest.raises(ModelError) as caught:
            _stream(model, f"[[emulator: fault={fault}]] Fail please.")
    finally:
        model.close()
    assert caught.value.code == code and caught.value.retryable is retryable


def _chunk_stream(body: bytes, status: int = 200) -> ChunkStream:
    transport = httpx.MockTransport(lambda request: httpx.Response(
        status, content=body, headers={"content-type": "text/event-stream"}))
    client = openai.OpenAI(api_key="x", base_url="http://test/v1", max_retries=0,
                           http_client=httpx.Client(transport=transport))
    return ChunkStream(client.chat.completions.with_streaming_response.create(
        model="qvq-max", stream=True, messages=[{"role": "user", "content": "hi"}]))


def test_framing_comments_multiline_data_and_done() -> None:
    body = (b": keep-alive\n\n"
            b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"a"},"finish_reason":null}]}\n\n'
            b'data: {"choices":[{"index":0,\ndata: "delta":{"content":"b"},"finish_reason":"stop"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,'
            b'"completion_tokens_details":{"reasoning_tokens":1,"audio_tokens":null}}}\n\n'
            b"data: [DONE]\n\n"
            b'data: {"choices":[{"index":0,"delta":{"content":"after done"}}]}\n\n')
    with _chunk_stream(body) as stream:
        chunks = list(stream)
    assert [c.choices[0].delta.reasoning_content for c in chunks[:1]] == ["a"]
    assert chunks[1].choices[0].delta.content == "b" and chunks[1].choices[0].finish_reason == "stop"
    assert chunks[2].usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
        "completion_tokens_details": {"reasoning_tokens": 1}}
    assert len(chunks) == 3


def test_an_error_event_mid_stream_raises_api_error() -> None:
    body = (b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
            b'data: {"error":{"message":"overloaded","code":"x"}}\n\n')
    with _chunk_stream(body) as stream, pytest.raises(openai.APIError, match="overloaded"):
        list(stream)


def test_an_http_error_status_raises_before_any_chunk() -> None:
    with pytest.raises(openai.RateLimitError):
        _chunk_stream(b'{"error":{"message":"slow down"}}', status=429)
