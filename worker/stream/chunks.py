"""A lean reader for the model's stream: the SDK sends the request, we read the server-sent events.

The openai SDK builds a pydantic model for every chunk through its generic `construct_type`, which
costs about 170 µs of CPU per chunk (py-spy: ~70% of a streaming thread's time, see bench/RESULTS.md);
with hundreds of streams in one process that alone saturates the GIL. Here the request, its headers,
auth and its HTTP status errors are still the SDK's (`with_streaming_response`), and each event is
only `json.loads`-ed into slotted objects that offer what `worker.model` reads of a chunk (`choices[i]
.delta.reasoning_content / .reasoning / .content`, `.finish_reason`, `usage.model_dump()`): ~10 µs.

An `{"error": ...}` event mid-stream raises `openai.APIError`, as the SDK's stream does; transport
errors surface as httpx exceptions, which `worker.model.map_error` maps like the SDK's wrappers.
It runs on the worker's event loop (worker/loop.py): a cancel or time limit cancels the reading coroutine.

Lines are split by `EventStreamDecoder` (contracts/bus/sse.py), from bytes, as the standard says (CR, LF
or CRLF only), so text holding U+2028, U+0085 and the like reaches the JSON decoder whole.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import openai

from contracts.bus.sse import EventStreamDecoder
from worker.stream.transport import BodyFeed, LoopStream

OnChunk = Callable[["Chunk"], bool]  # True: stop reading
BODY_END_GRACE_S = 1.0  # after [DONE], how long the body's last chunk may take for the connection to be kept


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if not future.done():
        future.set_exception(error) if error is not None else future.set_result(None)


def _drop_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


class Usage(dict):  # type: ignore[type-arg]
    def model_dump(self, *, exclude_none: bool = False, **_: Any) -> dict[str, Any]:
        return _drop_none(dict(self)) if exclude_none else dict(self)


class Delta:
    __slots__ = ("content", "reasoning_content", "reasoning", "role")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.content = raw.get("content")
        self.reasoning_content = raw.get("reasoning_content")
        self.reasoning = raw.get("reasoning")
        self.role = raw.get("role")


class Choice:
    __slots__ = ("index", "delta", "finish_reason")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.index = raw.get("index", 0)
        self.delta = Delta(raw.get("delta") or {})
        self.finish_reason = raw.get("finish_reason")


class Chunk:
    __slots__ = ("choices", "usage", "raw")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.raw = raw
        self.choices = [Choice(c) for c in raw.get("choices") or ()]
        usage = raw.get("usage")
        self.usage = Usage(usage) if usage else None


class ChunkStream:
    """Iterate the chunks of one streamed chat completion opened with `with_streaming_response`
    (AsyncOpenAI): `async with ChunkStream(manager) as stream: async for chunk in stream`.

    Entering sends the request; a non-2xx status raises the SDK's `APIStatusError` there, before any
    chunk, as `chat.completions.create(stream=True)` does.
    """

    def __init__(self, manager: Any) -> None:
        self._manager = manager
        self.http_response: Any = None

    async def __aenter__(self) -> ChunkStream:
        response = await self._manager.__aenter__()
        self.http_response = response.http_response
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._manager.__aexit__(None, None, None)

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        decoder = EventStreamDecoder()
        async for data in self.http_response.aiter_bytes():
            for payload in decoder.feed(data):
                if payload == "[DONE]":
                    return
                yield self._chunk(payload)

    async def each(self, on_chunk: OnChunk, *, stall_s: float) -> None:
        """Call `on_chunk` for every chunk until [DONE], the end of the body, or it returns True. On the
        worker's own connections (worker/stream/transport.py) the body is decoded where its bytes
        arrive, with no await per chunk; anywhere else (a mock transport, a proxy), through httpx."""
        network = self.http_response.extensions.get("network_stream")
        encoding = self.http_response.headers.get("content-encoding", "identity").lower()
        if not isinstance(network, LoopStream) or encoding != "identity":
            async for chunk in self:
                if on_chunk(chunk):
                    return
            return
        await self._direct(network, on_chunk, stall_s)

    async def _direct(self, network: LoopStream, on_chunk: OnChunk, stall_s: float) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()  # [DONE], a stop, the body's end or its error
        body_ended: asyncio.Future[None] = loop.create_future()
        decoder = EventStreamDecoder()
        last = [loop.time()]

        def end(error: BaseException | None) -> None:
            _settle(body_ended, None)
            _settle(done, error)

        def on_data(data: bytes) -> None:
            last[0] = loop.time()
            if done.done():
                return  # past [DONE]: the rest of the body (its last chunk) is only read to its end
            try:
                for payload in decoder.feed(data):
                    if payload == "[DONE]":
                        _settle(done, None)
                        return
                    if on_chunk(self._chunk(payload)):
                        feed.end(None)
                        return
            except BaseException as exc:  # StreamStopped, a bad chunk, an error event: the read ends with it
                feed.end(exc)

        def stalled() -> None:
            quiet = loop.time() - last[0]
            if quiet >= stall_s:
                feed.end(httpx.ReadTimeout(f"no data for {stall_s:g} s"))
            elif not feed.ended:
                timer[0] = loop.call_later(stall_s - quiet, stalled)

        length = self.http_response.headers.get("content-length")
        chunked = "chunked" in self.http_response.headers.get("transfer-encoding", "").lower()
        feed = BodyFeed(on_data, end, chunked=chunked,
                        length=int(length) if length and length.isdigit() and not chunked else None)
        timer = [loop.call_later(stall_s, stalled)]
        try:
            network.feed_body(feed)
            await done
            await self._keep_connection(network, feed, body_ended)
        finally:
            feed.ended = True  # a cancel: later bytes are dropped (the connection is closed on exit)
            timer[0].cancel()

    async def _keep_connection(self, network: LoopStream, feed: BodyFeed, body_ended: asyncio.Future[None]) -> None:
        """After [DONE]: wait (briefly) for the body's last chunk, then let h11 read the response's end,
        so the pool keeps the connection for the next call. Otherwise it is closed on exit."""
        if not feed.ended:
            try:
                async with asyncio.timeout(BODY_END_GRACE_S):
                    await asyncio.shield(body_ended)
            except TimeoutError:
                return
        if network.release_body(feed):
            async for _ in self.http_response.aiter_raw():
                pass

    def _chunk(self, payload: str) -> Chunk:
        raw = json.loads(payload)
        if isinstance(raw, dict) and raw.get("error"):
            error = raw["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(message if isinstance(message, str) and message else
                                  "An error occurred during streaming", self.http_response.request, body=error)
        return Chunk(raw)
