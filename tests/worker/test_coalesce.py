from __future__ import annotations

import math
import threading
import time

from tests.waiting import wait_until
from worker.stream.coalesce import DeltaCoalescer


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


def test_close_waits_for_a_background_flush_in_flight_and_nothing_follows_the_terminal_event() -> None:
    """The race of issue 10: the Flusher thread is inside emit (a slow publish) when the pipeline
    ends the run. close() must not return before that flush is in the log, and after it the
    terminal event is the last thing in the log whatever the stream thread still adds."""
    log: list[str] = []
    in_flight, release = threading.Event(), threading.Event()

    def emit(kind: str, text: str) -> None:
        if threading.current_thread().name.startswith("qvq-delta"):  # the background flush
            in_flight.set()
            assert release.wait(5)
        log.append(f"{kind}:{text}")

    coalescer = DeltaCoalescer(emit, max_delay_s=0.01, max_chars=1000)
    coalescer.add("reasoning.delta", "late")
    assert in_flight.wait(5), "the background flush never started"

    def end_run() -> None:
        coalescer.close()
        log.append("task.failed")

    ender = threading.Thread(target=end_run)
    ender.start()
    ender.join(0.2)
    assert ender.is_alive() and log == []  # close() is held by the flush in flight
    release.set()
    ender.join(5)
    coalescer.add("reasoning.delta", "after the end")  # the stream thread racing the end
    coalescer.flush()
    coalescer.flush_if_due(time.monotonic() + 10)
    assert log == ["reasoning.delta:late", "task.failed"]
    assert coalescer.refused == 1


def test_close_flushes_buffered_text_and_cancels_its_scheduled_flush() -> None:
    sink = Sink()
    coalescer = DeltaCoalescer(sink, max_delay_s=0.03, max_chars=1000)
    coalescer.add("answer.delta", "buffered")
    coalescer.close()
    sink("task.completed", "")
    # A second coalescer scheduled later than the first: once it has flushed, the Flusher has passed
    # the closed one's deadline too.
    witness = Sink()
    DeltaCoalescer(witness, max_delay_s=0.06, max_chars=1000).add("answer.delta", "w")
    wait_until(lambda: bool(witness.events))
    assert [(k, t) for k, t, _ in sink.events] == [("answer.delta", "buffered"), ("task.completed", "")]
