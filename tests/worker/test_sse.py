"""worker/stream/chunks.py (the lean stream reader) through QvqModel against the emulator over HTTP, and
the SSE framing cases the emulator does not produce, on a mock transport. Both run on an event loop, as
on the worker's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pytest

from contracts.errors import ModelError, StreamStopped
from contracts.settings import Settings
from contracts.tokens import estimate_text_tokens
from tests.loopback_proxy import LoopbackProxy
from worker.stream.chunks import ChunkStream
from worker.stream.model import QvqModel


def _model(url: str, **overrides: Any) -> QvqModel:
    return QvqModel(Settings(base_url=url, worker_concurrency=4, **overrides))


def _stream(model: QvqModel, prompt: str, **options: Any) -> Any:
    parts: list[tuple[str, str]] = []

    async def call() -> Any:
        try:
            return await model.stream(model="qvq-max", messages=[{"role": "user", "content": prompt}],
                                      high_resolution=False, attempt=1,
                                      on_text=lambda kind, text: parts.append((kind, text)), **options)
        finally:
            await model.aclose()

    return asyncio.run(call()), parts


def test_streams_text_and_usage_like_the_sdk(emulator: Any) -> None:
    result, parts = _stream(_model(emulator.url), "[[emulator: reasoning_tokens=30 answer_tokens=10]] Hello there.")
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
    with pytest.raises(ModelError) as caught:
        _stream(_model(emulator.url), f"[[emulator: fault={fault}]] Fail please.")
    assert caught.value.code == code and caught.value.retryable is retryable


def _mock_client(body: bytes, status: int = 200) -> openai.AsyncOpenAI:
    transport = httpx.MockTransport(lambda request: httpx.Response(
        status, content=body, headers={"content-type": "text/event-stream"}))
    return openai.AsyncOpenAI(api_key="x", base_url="http://test/v1", max_retries=0,
                              http_client=httpx.AsyncClient(transport=transport))


def _chunks(body: bytes, status: int = 200) -> list[Any]:
    """Every chunk ChunkStream reads of this response body (or the error it raises)."""
    async def read() -> list[Any]:
        client = _mock_client(body, status)
        stream = ChunkStream(client.chat.completions.with_streaming_response.create(
            model="qvq-max", stream=True, messages=[{"role": "user", "content": "hi"}]))
        async with stream:
            return [chunk async for chunk in stream]

    return asyncio.run(read())


def test_framing_comments_multiline_data_and_done() -> None:
    body = (b": keep-alive\n\n"
            b'data: {"choices":[{"index":0,"delta":{"reasoning_content":"a"},"finish_reason":null}]}\n\n'
            b'data: {"choices":[{"index":0,\ndata: "delta":{"content":"b"},"finish_reason":"stop"}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3,'
            b'"completion_tokens_details":{"reasoning_tokens":1,"audio_tokens":null}}}\n\n'
            b"data: [DONE]\n\n"
            b'data: {"choices":[{"index":0,"delta":{"content":"after done"}}]}\n\n')
    chunks = _chunks(body)
    assert [c.choices[0].delta.reasoning_content for c in chunks[:1]] == ["a"]
    assert chunks[1].choices[0].delta.content == "b" and chunks[1].choices[0].finish_reason == "stop"
    assert chunks[2].usage.model_dump(exclude_none=True) == {
        "prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3,
        "completion_tokens_details": {"reasoning_tokens": 1}}
    assert len(chunks) == 3


def test_an_error_event_mid_stream_raises_api_error() -> None:
    body = (b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
            b'data: {"error":{"message":"overloaded","code":"x"}}\n\n')
    with pytest.raises(openai.APIError, match="overloaded"):
        _chunks(body)


def test_an_http_error_status_raises_before_any_chunk() -> None:
    with pytest.raises(openai.RateLimitError):
        _chunks(b'{"error":{"message":"slow down"}}', status=429)


# -- the line rules of the standard: CR, LF or CRLF, nothing else ----------------------------------
EXOTIC = "line\u2028sep para\u2029sep next\u0085line bom\ufeffmid lone\rcr vt\x0bff\x0cfs\x1cend"


def test_model_text_with_unicode_line_breaks_arrives_exact(emulator: Any) -> None:
    """The emulator echoes the prompt in its thinking and answer; its JSON holds U+2028, U+0085 and
    U+FEFF raw (only the CR is escaped, as JSON requires)."""
    result, parts = _stream(_model(emulator.url), f"[[emulator: reasoning_tokens=5 answer_tokens=5]] {EXOTIC}")
    assert result.finish_reason == "stop" and EXOTIC in result.answer and EXOTIC in result.reasoning
    assert result.answer == "".join(t for k, t in parts if k == "answer")


def _events(body: bytes, sizes: list[int] | None = None) -> list[str]:
    from contracts.bus.sse import EventStreamDecoder

    decoder = EventStreamDecoder()
    out: list[str] = []
    if sizes is None:
        sizes = [len(body)]
    start = 0
    for size in sizes:
        out.extend(decoder.feed(body[start:start + size]))
        start += size
    out.extend(decoder.feed(body[start:]))
    return out


def test_lines_end_at_cr_lf_and_crlf_only_even_split_across_reads() -> None:
    raw = ('\ufeffdata: {"t":"a\u2028b\u0085c"}\r\n\r\n'
           'data:x\rdata: y\r\r'
           ': a comment\n'
           'event: ignored\nid: 7\ndata\n\n'
           'data: z\n\n'
           'data: never dispatched').encode()
    whole = _events(raw)
    assert whole == ['{"t":"a\u2028b\u0085c"}', "x\ny", "", "z"]
    for cut in range(1, len(raw)):  # every split of the bytes into two reads gives the same events
        assert _events(raw, [cut]) == whole, cut
    assert _events(raw, [1] * len(raw)) == whole


def test_a_crlf_split_between_reads_is_one_line_end() -> None:
    assert _events(b'data: 1\r\n\r\ndata: 2\r\n\r\n', [8, 1, 1, 1]) == ["1", "2"]


def test_a_chunk_with_raw_unicode_breaks_is_decoded_whole() -> None:
    text = "a\u2028b\u2029c\u0085d\ufeffe\rf"
    chunk = json.dumps({"choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]},
                       ensure_ascii=False)
    body = f"data: {chunk}\n\ndata: [DONE]\n\n".encode()
    chunks = _chunks(body)
    assert [c.choices[0].delta.content for c in chunks] == [text]


# -- a server that ignores include_usage ------------------------------------------------------------
def test_a_stream_without_usage_completes_with_an_estimate(emulator: Any) -> None:
    result, _ = _stream(_model(emulator.url), "[[emulator: no_usage=1]] Hi", prompt_tokens_estimate=321)
    assert result.usage is not None and result.usage["estimated"] is True
    assert result.usage["prompt_tokens"] == 321
    assert result.usage["completion_tokens"] == estimate_text_tokens(result.reasoning + result.answer) > 0
    assert result.usage["total_tokens"] == 321 + result.usage["completion_tokens"]


def test_a_stream_without_finish_reason_is_broken_even_with_usage() -> None:
    body = (b'data: {"choices":[{"index":0,"delta":{"content":"a"},"finish_reason":null}]}\n\n'
            b'data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}\n\n'
            b"data: [DONE]\n\n")
    model = _model("http://test/v1")
    model._client = _mock_client(body)
    with pytest.raises(ModelError) as caught:
        _stream(model, "hi")
    assert caught.value.code == "model.stream_broken"


def test_consecutive_model_calls_share_one_connection_and_a_stopped_one_is_not_reused(emulator: Any) -> None:
    async def scenario() -> tuple[list[str], int, int]:
        proxy = LoopbackProxy(emulator.url)
        model = _model(proxy.url)
        answers = []
        for n in range(3):
            result = await model.stream(
                model="qvq-max", messages=[{"role": "user", "content": f"[[emulator: answer_tokens=5]] Q{n}"}],
                high_resolution=False, attempt=1, on_text=lambda kind, text: None)
            answers.append(result.answer)
        after_three = proxy.accepted
        stop = [False]

        def on_text(kind: str, text: str) -> None:
            stop[0] = True

        with pytest.raises(StreamStopped):
            await model.stream(model="qvq-max", messages=[{"role": "user", "content": "Stop me."}],
                               high_resolution=False, attempt=1, on_text=on_text, should_stop=lambda: stop[0])
        await model.stream(model="qvq-max", messages=[{"role": "user", "content": "After the stop."}],
                           high_resolution=False, attempt=1, on_text=lambda kind, text: None)
        await model.aclose()
        return answers, after_three, proxy.accepted

    answers, after_three, after_five = asyncio.run(scenario())
    assert all(answers) and after_three == 1  # three whole streams, one connection
    assert after_five == 2  # the stopped stream's connection was closed; the next call opened a new one
