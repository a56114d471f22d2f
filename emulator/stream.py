"""The SSE stream of one completion: chunk shapes (qvq-api.md, "The stream"), pacing and stream faults.

Token i is due at start + first_token_s + i / tps (an absolute schedule, so no drift). Chunks that
are already due when one is written (tps=0, or a loaded emulator catching up) go out in one write.
A `cut` ends the response by raising StreamCut: uvicorn then closes the connection without the
terminating chunk, as a broken upstream would; the log record of that exception is filtered out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from emulator.config import EmulatorConfig
from emulator.faults import Fault
from emulator.script import Script
from emulator.stats import Stats

NAP_S = 0.2  # the longest sleep between looks at the stop flag
MAX_BATCH = 64  # chunks in one write at most
DONE = b"data: [DONE]\n\n"


class StreamCut(Exception):
    """Raised inside a response on purpose to drop the connection mid-stream."""


class _HideStreamCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, StreamCut)


def hide_stream_cuts_in_uvicorn_log() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideStreamCuts) for f in logger.filters):
        logger.addFilter(_HideStreamCuts())


@dataclass(frozen=True)
class Completion:
    model: str
    script: Script
    usage: dict[str, Any] | None
    config: EmulatorConfig
    fault: Fault | None
    completion_id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4()}")
    created: int = field(default_factory=lambda: int(time.time()))


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


class ChunkWriter:
    """Encodes the chunks of one completion; the JSON around each delta is built once."""

    def __init__(self, completion: Completion) -> None:
        self._head = {
            "id": completion.completion_id,
            "object": "chat.completion.chunk",
            "created": completion.created,
            "model": completion.model,
            "system_fingerprint": None,
        }
        self._open = b"data: " + _json(self._head)[:-1] + b',"choices":[{"index":0,"delta":'
        self._stamp = completion.config.stamp_chunks

    def _choice(self, delta: bytes, finish_reason: bytes = b"null") -> bytes:
        return (
            self._open + delta + b',"finish_reason":' + finish_reason + b',"logprobs":null}]' + self._close()
        )

    def _close(self) -> bytes:
        return (b',"x_sent_at":' + repr(time.time()).encode() if self._stamp else b"") + b"}\n\n"

    def role(self) -> bytes:
        return self._choice(b'{"role":"assistant","content":null,"reasoning_content":""}')

    def reasoning(self, text: str) -> bytes:
        return self._choice(b'{"content":null,"reasoning_content":' + _json(text) + b"}")

    def answer(self, text: str) -> bytes:
        return self._choice(b'{"content":' + _json(text) + b"}")

    def closing(self) -> bytes:
        return self._choice(b'{"content":"","reasoning_content":null}', b'"stop"')

    def usage(self, usage: dict[str, Any]) -> bytes:
        return b"data: " + _json({**self._head, "choices": [], "usage": usage})[:-1] + self._close()


def plan(completion: Completion) -> Iterator[tuple[bool, Callable[[], bytes]]]:
    """Every chunk in order: whether it is a token (thinking or answer), and how to encode it."""
    writer = ChunkWriter(completion)
    yield False, writer.role
    for text in completion.script.reasoning:
        yield True, partial(writer.reasoning, text)
    for text in completion.script.answer:
        yield True, partial(writer.answer, text)
    yield False, writer.closing
    if completion.usage is not None:
        yield False, partial(writer.usage, completion.usage)


class Pacer:
    """When each token is due, and sleeping until then; raises StreamCut once the emulator stops."""

    def __init__(self, config: EmulatorConfig, stopping: Callable[[], bool]) -> None:
        self._clock = asyncio.get_running_loop().time
        self._start = self._clock() + config.first_token_s
        self._tps = config.tps
        self._stopping = stopping

    def due(self, token_index: int) -> float:
        return self._start + (token_index / self._tps if self._tps > 0 else 0.0)

    def is_due(self, due: float) -> bool:
        return due <= self._clock()

    async def until(self, due: float) -> None:
        while True:
            if self._stopping():
                raise StreamCut("the emulator is stopping")
            delay = due - self._clock()
            if delay <= 0:
                return
            await asyncio.sleep(min(delay, NAP_S))

    async def stall(self) -> None:
        await self.until(math.inf)


async def sse_events(
    completion: Completion, stats: Stats, stopping: Callable[[], bool]
) -> AsyncIterator[bytes]:
    """The response body; stats follow what happens, the client going away included."""
    stats.streams_started += 1
    stats.streams_active += 1
    ended = False
    try:
        async for data in _writes(completion, stats, Pacer(completion.config, stopping)):
            yield data
        stats.streams_completed += 1
        ended = True
    except StreamCut:
        stats.streams_cut += 1
        ended = True
        raise
    finally:
        stats.streams_active -= 1
        if not ended:
            stats.disconnects += 1


async def _writes(completion: Completion, stats: Stats, pacer: Pacer) -> AsyncIterator[bytes]:
    fault = completion.fault
    cut_after = fault.arg if fault is not None and fault.kind == "cut" else None
    stall = fault is not None and fault.kind == "stall"
    batch: list[bytes] = []
    tokens = 0
    for sent, (is_token, encode) in enumerate(plan(completion)):
        if sent == cut_after:
            break
        due = pacer.due(tokens)
        if batch and (len(batch) >= MAX_BATCH or not pacer.is_due(due)):
            yield b"".join(batch)
            batch.clear()
            if pacer.is_due(due):
                await asyncio.sleep(0)  # still due: let the other streams have the loop first
        await pacer.until(due)
        tokens += is_token
        stats.tokens_streamed += is_token
        batch.append(encode())
        if stall:
            yield batch.pop()
            await pacer.stall()
    if cut_after is not None:
        if batch:
            yield b"".join(batch)
        raise StreamCut(f"fault cut:{cut_after}")
    yield b"".join([*batch, DONE])
