from __future__ import annotations

import math
import threading
import time

from worker.coalesce import DeltaCoalescer


class Sink:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, float]] = []
        self.lock = threading.Lock()

    def __call__(self, kind: str, text: str) -> None:
        with self.lock:
            self.events.append((kind, text, time.monotonic()))


def test_2000_one_character_deltas_become_few_events_with_the_same_text() -> None:
    sink = Sink()
    coalescer = DeltaCoalescer(sink, max_delay_s=0.05, max_chars=256)
    text = "".join(chr(ord("a") + i % 26) for i in range(2000))
    started = time.monotonic()
    for ch in text:
        coalescer.add("reasoning.delta", ch)
        time.sleep(0.0002)
    coalescer.flush()
    elapsed = time.monotonic() - started
    # Each flush holds >= 256 chars or >= 50 ms of text: at most one per 256 chars plus one per 50 ms.
    bound = math.ceil(2000 / 256) + math.ceil(elapsed / 0.05) + 1
    assert len(sink.events) <= bound < 2000 / 4
    assert "".join(t for _, t, _ in sink.events) == text


def test_a_kind_change_flushes_first_and_keeps_order() -> None:
    sink = Sink()
    coalescer = DeltaCoalescer(sink, max_delay_s=10, max_chars=1000)
    coalescer.add("reasoning.delta", "think ")
    coalescer.add("reasoning.delta", "more")
    coalescer.add("answer.delta", "42")
    coalescer.flush()
    assert [(k, t) for k, t, _ in sink.events] == [("reasoning.delta", "think more"), ("answer.delta", "42")]


def test_quiet_text_is_flushed_by_the_deadline() -> None:
    sink = Sink()
    coalescer = DeltaCoalescer(sink, max_delay_s=0.05, max_chars=1000)
    added = time.monotonic()
    coalescer.add("answer.delta", "hi")
    deadline = time.monotonic() + 2
    while not sink.events and time.monotonic() < deadline:
        time.sleep(0.005)
    assert sink.events and sink.events[0][1] == "hi"
    assert 0.04 <= sink.events[0][2] - added < 1.0


def test_zero_delay_means_no_coalescing() -> None:
    sink = Sink()
    coalescer = DeltaCoalescer(sink, max_delay_s=0, max_chars=256)
    for ch in "abc":
        coalescer.add("answer.delta", ch)
    assert [t for _, t, _ in sink.events] == ["a", "b", "c"]


def test_discard_drops_the_failed_attempts_text() -> None:
    sink = Sink()
    coalescer = DeltaCoalescer(sink, max_delay_s=10, max_chars=1000)
    coalescer.add("answer.delta", "void")
    coalescer.discard()
    coalescer.flush()
    assert sink.events == []
