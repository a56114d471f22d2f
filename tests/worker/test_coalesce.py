"""The delta coalescer, on an event loop (as on the worker's): loop timers, no threads."""

from __future__ import annotations

import asyncio
import math
import time

from worker.stream.coalesce import DeltaCoalescer


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []

    def __call__(self, kind: str, text: str) -> None:
        self.events.append((kind, text, time.monotonic()))


def test_2000_one_character_deltas_become_few_events_with_the_same_text() -> None:
    async def scenario() -> tuple[Sink, float]:
        sink = Sink()
        coalescer = DeltaCoalescer(sink, max_delay_s=0.05, max_chars=256)
        started = time.monotonic()
        for ch in TEXT:
            coalescer.add("reasoning.delta", ch)
            await asyncio.sleep(0.0002)
        coalescer.flush()
        return sink, time.monotonic() - started

    sink, elapsed = asyncio.run(scenario())
    # Each flush holds >= 256 chars or >= 50 ms of text: at most one per 256 chars plus one per 50 ms.
    bound = math.ceil(2000 / 256) + math.ceil(elapsed / 0.05) + 1
    assert len(sink.events) <= bound < 2000 / 4
    assert "".join(t for _, t, _ in sink.events) == TEXT


TEXT = "".join(chr(ord("a") + i % 26) for i in range(2000))


def test_a_kind_change_flushes_first_and_keeps_order() -> None:
    async def scenario() -> Sink:
        sink = Sink()
        coalescer = DeltaCoalescer(sink, max_delay_s=10, max_chars=1000)
        coalescer.add("reasoning.delta", "think ")
        coalescer.add("reasoning.delta", "more")
        coalescer.add("answer.delta", "42")
        coalescer.close()
        return sink

    sink = asyncio.run(scenario())
    assert [(k, t) for k, t, _ in sink.events] == [("reasoning.delta", "think more"), ("answer.delta", "42")]


def test_quiet_text_is_flushed_by_the_deadline() -> None:
    async def scenario() -> tuple[Sink, float]:
        sink = Sink()
        coalescer = DeltaCoalescer(sink, max_delay_s=0.05, max_chars=1000)
        added = time.monotonic()
        coalescer.add("answer.delta", "hi")
        deadline = time.monotonic() + 5
        while not sink.events and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        return sink, added

    sink, added = asyncio.run(scenario())
    assert sink.events and sink.events[0][1] == "hi"
    assert 0.04 <= sink.events[0][2] - added < 5.0


def test_zero_delay_means_no_coalescing() -> None:
    async def scenario() -> Sink:
        sink = Sink()
        coalescer = DeltaCoalescer(sink, max_delay_s=0, max_chars=256)
        for ch in "abc":
            coalescer.add("answer.delta", ch)
        return sink

    assert [t for _, t, _ in asyncio.run(scenario()).events] == ["a", "b", "c"]


def test_discard_drops_the_failed_attempts_text_and_its_timer() -> None:
    async def scenario() -> Sink:
        sink = Sink()
        coalescer = DeltaCoalescer(sink, max_delay_s=0.01, max_chars=1000)
        coalescer.add("answer.delta", "void")
        coalescer.discard()
        await asyncio.sleep(0.05)  # past the deadline the timer would have had
        coalescer.flush()
        return sink

    assert asyncio.run(scenario()).events == []


def test_nothing_follows_close_neither_text_nor_its_timer() -> None:
    """The pipeline closes the coalescer before the terminal event: what was buffered goes first, and
    neither a late piece of text nor the deadline of the closed buffer publishes anything after it."""
    async def scenario() -> tuple[list[str], DeltaCoalescer]:
        log: list[str] = []
        coalescer = DeltaCoalescer(lambda kind, text: log.append(f"{kind}:{text}"), max_delay_s=0.02,
                                   max_chars=1000)
        coalescer.add("reasoning.delta", "late")
        coalescer.close()
        log.append("task.failed")
        coalescer.add("reasoning.delta", "after the end")
        await asyncio.sleep(0.08)  # past every deadline
        return log, coalescer

    log, coalescer = asyncio.run(scenario())
    assert log == ["reasoning.delta:late", "task.failed"]
    assert coalescer.refused == 1
