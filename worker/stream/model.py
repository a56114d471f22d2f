"""The QVQ call: one streamed chat completion through the openai SDK, errors mapped to ours.

The SDK's own retries are off (max_retries=0): the pipeline owns the retry policy, so a quota 429 is
never retried blindly and every retry is visible as a task.retrying event.

The call is a coroutine on the worker's event loop (worker/loop.py): AsyncOpenAI builds the request,
its auth and its status errors; worker/stream/chunks.py reads the events, and worker/stream/transport.py
carries the bytes (httpx and httpcore over plain asyncio transports). Opening the stream (up to the
response headers) has a total deadline, QVQ_CONNECT_TIMEOUT_S; after that, each read may wait
QVQ_STALL_TIMEOUT_S, and the task's time limit bounds the whole (the cancel watcher closes it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx
import openai

from contracts import tracing
from contracts.errors import ModelError, StreamStopped
from contracts.settings import Settings
from contracts.tokens import estimate_text_tokens
from worker.loop import TaskCloser, uncancel_current
from worker.stream.chunks import Chunk, ChunkStream
from worker.stream.transport import model_transport

OnText = Callable[[str, str], None]  # ("reasoning" | "answer", text)
# Idle model connections kept for the next call (saving its TCP and TLS handshake). httpcore's pool checks
# every idle connection against all the others on each request and each response's end (O(idle x all)):
# with 200 kept, the end of 200 streams spent 36% of the loop's GIL time there and delayed the streams
# still running (bench/RESULTS.md). Once more connections than this are open, a finished one is closed.
KEEPALIVE_CONNECTIONS = 16

# 429 texts that mean "you will not get more by waiting" (qvq-api.md, Errors).
_QUOTA_429 = ("free allocated quota exceeded", "overdue", "arrearage", "not purchased", "billing")


@dataclass
class StreamResult:
    reasoning: str = ""
    answer: str = ""
    usage: dict[str, Any] | None = None
    finish_reason: str | None = None
    first_reasoning_at: float | None = None
    first_answer_at: float | None = None
    chunks: int = 0
    _reasoning_parts: list[str] = field(default_factory=list, repr=False)
    _answer_parts: list[str] = field(default_factory=list, repr=False)

    def add(self, kind: str, text: str) -> None:
        now = time.time()
        if kind == "reasoning":
            self._reasoning_parts.append(text)
            self.first_reasoning_at = self.first_reasoning_at or now
        else:
            self._answer_parts.append(text)
            self.first_answer_at = self.first_answer_at or now

    def finish(self) -> StreamResult:
        self.reasoning = "".join(self._reasoning_parts)
        self.answer = "".join(self._answer_parts)
        return self


class QvqModel:
    """One per worker process: an AsyncOpenAI client with a connection pool sized for the concurrency.
    Used only on the worker's loop (the httpx.AsyncClient belongs to that loop)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._client: openai.AsyncOpenAI | None = None

    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            settings = self.settings
            timeout = httpx.Timeout(connect=min(10.0, settings.connect_timeout_s), read=settings.stall_timeout_s,
                                    write=60.0, pool=30.0)
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=KEEPALIVE_CONNECTIONS)
            # Recent openai releases type their client against the `httpx2` fork; a plain httpx.AsyncClient
            # works with every release (tested), and keeps transport errors in the httpx tree map_error knows.
            self._client = openai.AsyncOpenAI(
                api_key=settings.dashscope_api_key or "not-needed-for-the-emulator",
                base_url=settings.base_url,
                max_retries=0,
                timeout=timeout,  # type: ignore[arg-type]
                http_client=httpx.AsyncClient(timeout=timeout, limits=limits,  # type: ignore[arg-type]
                                              transport=model_transport(limits)),
            )
        return self._client

    async def warm(self) -> None:
        """Load now, on the loop, what the first call would load lazily (the SDK's chat resources,
        anyio's asyncio backend): tens of ms of imports, holding the GIL while other streams flow."""
        _ = self.client.chat.completions.with_streaming_response
        await anyio.sleep(0)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.close()

    async def stream(
        self, *, model: str, messages: list[dict[str, Any]], high_resolution: bool, attempt: int,
        on_text: OnText, should_stop: Callable[[], bool] = lambda: False,
        on_open: Callable[[Any], None] | None = None, prompt_tokens_estimate: int | None = None,
        trace: dict[str, str] | None = None,
    ) -> StreamResult:
        """Stream one completion, calling on_text for every piece of text as it arrives.

        `on_open`, called once the service accepted the call, receives a handle whose `close()` (any
        thread) stops the stream at once; after a close, or whenever `should_stop()` says so,
        StreamStopped carries the text so far.

        A stream that ends without `finish_reason` is broken (model.stream_broken). One that ends
        properly without a usage chunk (a server that ignores include_usage) completes, with usage
        counted by us and marked `"estimated": True`: `prompt_tokens_estimate` (the worker's count of
        the request) and an estimate of the text received. The request carries the trace context: the
        current span's, else `trace` as the caller gave it (contracts/tracing.py).
        """
        result = StreamResult()
        closer = TaskCloser.current()
        try:
            await self._read(model, messages, high_resolution, {"X-Qvq-Attempt": str(attempt), **tracing.outgoing(trace)},
                             on_text, should_stop, result, lambda: on_open(closer) if on_open else None)
        except asyncio.CancelledError:
            closer.disarm()
            if not closer.fired:
                raise
            uncancel_current()
            raise StreamStopped(result.finish()) from None
        finally:
            closer.disarm()
        if should_stop():
            raise StreamStopped(result.finish())
        if result.finish_reason is None:
            raise ModelError("the stream ended before its final chunk", code="model.stream_broken")
        result.finish()
        if result.usage is None:
            result.usage = estimated_usage(result, messages, prompt_tokens_estimate)
        return result

    async def _read(self, model: str, messages: list[dict[str, Any]], high_resolution: bool, headers: dict[str, str],
                    on_text: OnText, should_stop: Callable[[], bool], result: StreamResult,
                    opened: Callable[[], None]) -> None:
        manager = self.client.chat.completions.with_streaming_response.create(  # type: ignore[call-overload]
            model=model, messages=messages, stream=True,
            stream_options={"include_usage": True},
            extra_body={"vl_high_resolution_images": True} if high_resolution else None,
            extra_headers=headers,
        )
        stream = ChunkStream(manager)
        try:
            async with asyncio.timeout(self.settings.connect_timeout_s):
                await stream.__aenter__()
        except TimeoutError as exc:
            raise ModelError(f"the model service did not answer within {self.settings.connect_timeout_s:g} s "
                             "(QVQ_CONNECT_TIMEOUT_S)", code="model.timeout") from exc
        except openai.OpenAIError as exc:
            raise map_error(exc, started=False) from exc
        def take(chunk: Chunk) -> bool:
            result.chunks += 1
            _read_chunk(chunk, result, on_text)
            if should_stop():
                raise StreamStopped(result.finish())
            return False

        try:
            opened()  # the service accepted the call (it may bill it): the stream can be closed from now on
            await stream.each(take, stall_s=self.settings.stall_timeout_s)
        except StreamStopped:
            raise
        except (openai.OpenAIError, httpx.HTTPError) as exc:
            if should_stop():
                raise StreamStopped(result.finish()) from exc
            raise map_error(exc, started=True) from exc
        finally:
            await asyncio.shield(stream.__aexit__())


def estimated_usage(result: StreamResult, messages: list[dict[str, Any]],
                    prompt_tokens_estimate: int | None) -> dict[str, Any]:
    """Our own count for a stream that carried no usage (the bill is then marked estimated)."""
    prompt = prompt_tokens_estimate
    if prompt is None:  # the caller did not count the request: its text at least (images unknown)
        prompt = estimate_text_tokens("".join(_texts(messages)))
    completion = estimate_text_tokens(result.reasoning + result.answer)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "estimated": True}


def _texts(messages: list[dict[str, Any]]) -> list[str]:
    out: list[str] = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out.extend(part.get("text") or "" for part in content if isinstance(part, dict))
    return out


def _read_chunk(chunk: Any, result: StreamResult, on_text: OnText) -> None:
    if chunk.usage is not None:
        result.usage = chunk.usage.model_dump(exclude_none=True)
    for choice in chunk.choices or ():
        delta = choice.delta
        # reasoning_content is an undeclared extra (vLLM names it `reasoning`): read both, defensively.
        reasoning = getattr(delta, "reasoning_content", None) or getattr(delta, "reasoning", None)
        if reasoning:
            result.add("reasoning", reasoning)
            on_text("reasoning", reasoning)
        if delta.content:
            result.add("answer", delta.content)
            on_text("answer", delta.content)
        if choice.finish_reason:
            result.finish_reason = choice.finish_reason


def map_error(exc: BaseException, *, started: bool) -> ModelError:
    """Translate an openai/httpx exception into our error codes (qvq-api.md, Errors)."""
    if isinstance(exc, openai.APIStatusError):
        return _map_status(exc)
    if isinstance(exc, openai.APITimeoutError | httpx.TimeoutException):
        return ModelError(f"no data from the model service for too long ({exc})", code="model.timeout")
    if started:
        return ModelError(f"the stream broke: {exc}", code="model.stream_broken")
    return ModelError(f"cannot reach the model service: {exc}", code="model.unavailable")


def _map_status(exc: openai.APIStatusError) -> ModelError:
    status, message = exc.status_code, _message(exc)
    if status == 429:
        quota = any(marker in message.lower() for marker in _QUOTA_429)
        return ModelError(f"429 {message}", code="model.rate_limited", retryable=not quota,
                          retry_after_s=_retry_after(exc.response))
    if status == 408:
        return ModelError(f"408 {message}", code="model.timeout")
    if status >= 500:
        return ModelError(f"{status} {message}", code="model.unavailable",
                          retry_after_s=_retry_after(exc.response))
    return ModelError(f"{status} {message}", code="model.rejected")


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    error = body.get("error", body) if isinstance(body, dict) else {}
    if isinstance(error, dict) and error.get("message"):
        code = error.get("code")
        return f"{code}: {error['message']}" if code else str(error["message"])
    return str(exc.message)


def _retry_after(response: Any) -> float | None:
    if response is None:
        return None
    raw = response.headers.get("retry-after")
    try:
        return max(0.0, float(raw)) if raw else None
    except ValueError:
        return None
