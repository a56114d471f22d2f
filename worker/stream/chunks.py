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

import json
from collections.abc import AsyncIterator
from typing import Any

import openai

from contracts.bus.sse import EventStreamDecoder


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

    def _chunk(self, payload: str) -> Chunk:
        raw = json.loads(payload)
        if isinstance(raw, dict) and raw.get("error"):
            error = raw["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise openai.APIError(message if isinstance(message, str) and message else
                                  "An error occurred during streaming", self.http_response.request, body=error)
        return Chunk(raw)
