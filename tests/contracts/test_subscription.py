"""The subscription core without I/O: runs, the row as the truth, reconnections, on a fake clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis

from contracts import events as ev
from contracts.bus.subscription import (
    END,
    MAX_RECONNECTS,
    READ_ROW,
    ROW_CHECK_S,
    ROW_GRACE_S,
    SUBSCRIBE,
    Deliver,
    ReadLog,
    Sleep,
    SubscriptionState,
    WaitLive,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Row:
    status: str
    id: str = "t"
    attempts: int = 2
    run: int = 0
    last_seq: int = 0
    reasoning: str | None = "why"
    answer: str | None = "42"
    usage: dict[str, Any] | None = field(default_factory=lambda: {"prompt_tokens": 1})
    cost: dict[str, Any] | None = field(default_factory=lambda: {"total": 0.1})
    timings: dict[str, Any] | None = None
    error_code: str | None = None
    error_message: str | None = None
    request: dict[str, Any] = field(default_factory=dict)


def entry(seq: int, type_: str, **fields: Any) -> tuple[bytes, dict[bytes, bytes]]:
    event = {"seq": seq, "task_id": "t", "type": type_, "ts": 0.0, "attempt": 1, **fields}
    return f"{seq}-0".encode(), {b"event": json.dumps(event).encode()}


def live(seq: int, type_: str, **fields: Any) -> dict[str, Any]:
    return {"type": "message", "data": entry(seq, type_, **fields)[1][b"event"]}


def drain(state: SubscriptionState) -> list[dict[str, Any]]:
    out = []
    while isinstance(action := state.next(), Deliver):
        out.append(action.event)
        state.delivered()
    return out


def subscribed(state: SubscriptionState, log: list[Any]) -> list[dict[str, Any]]:
    assert state.next() is SUBSCRIBE
    state.subscribed()
    action = state.next()
    assert isinstance(action, ReadLog) and action.start == "-"
    state.take_log(log)
    return drain(state)


def test_a_failed_run_followed_by_a_retry_does_not_end_the_replay() -> None:
    state = SubscriptionState("t", clock=Clock())
    log = [entry(1, ev.QUEUED, run=0), entry(2, ev.FAILED), entry(3, ev.QUEUED, run=1),
           entry(4, ev.STARTED), entry(5, ev.ANSWER_DELTA, text="x"), entry(6, ev.COMPLETED)]
    assert [e["seq"] for e in subscribed(state, log)] == [1, 2, 3, 4, 5, 6]
    assert state.next() is END


def test_a_replay_ends_at_the_latest_runs_terminal_event_and_goes_no_further() -> None:
    state = SubscriptionState("t", clock=Clock())
    log = [entry(1, ev.QUEUED), entry(2, ev.FAILED), entry(3, ev.ANSWER_DELTA, text="stray")]
    assert [e["seq"] for e in subscribed(state, log)] == [1, 2]
    assert state.next() is END


def test_a_retried_run_in_progress_is_followed_live_to_its_end() -> None:
    state = SubscriptionState("t", clock=Clock())
    log = [entry(1, ev.QUEUED), entry(2, ev.FAILED), entry(3, ev.QUEUED, run=1)]
    assert len(subscribed(state, log)) == 3
    assert isinstance(state.next(), WaitLive)
    state.take_message(live(4, ev.STARTED))
    state.take_message(live(5, ev.CANCELLED))
    assert [e["type"] for e in drain(state)] == [ev.STARTED, ev.CANCELLED]
    assert state.next() is END


def test_a_live_gap_is_filled_from_the_log_and_a_quiet_channel_reads_it_again() -> None:
    state = SubscriptionState("t", clock=Clock())
    subscribed(state, [entry(1, ev.QUEUED)])
    state.take_message(live(3, ev.STARTED))
    assert isinstance(state.next(), ReadLog)
    state.take_log([entry(2, ev.IMAGES_READY), entry(3, ev.STARTED)])
    assert [e["seq"] for e in drain(state)] == [2, 3]
    state.take_message(None)
    assert isinstance(action := state.next(), ReadLog) and action.start == "(3-0"


def test_a_terminal_row_without_its_event_ends_with_one_made_from_the_row() -> None:
    clock = Clock()
    state = SubscriptionState("t", checks_row=True, clock=clock)
    subscribed(state, [entry(1, ev.QUEUED), entry(2, ev.STARTED)])
    assert isinstance(action := state.next(), WaitLive) and action.timeout <= 1.0
    clock.now += ROW_CHECK_S
    assert state.next() is READ_ROW
    state.take_row(Row("running"))
    clock.now += ROW_CHECK_S
    assert state.next() is READ_ROW
    state.take_row(Row("completed", last_seq=1))
    assert isinstance(state.next(), ReadLog)  # its event may be on its way: one more look at the log
    state.take_log([])
    clock.now += ROW_GRACE_S
    assert state.next() is READ_ROW
    state.take_row(Row("completed", last_seq=1))
    [event] = drain(state)
    assert event["type"] == ev.COMPLETED and event["from_row"] is True and event["seq"] == 3
    assert event["answer"] == "42" and event["reasoning"] == "why" and event["usage"] == {"prompt_tokens": 1}
    assert state.next() is END


def test_the_terminal_event_arriving_within_the_grace_wins_over_the_row() -> None:
    clock = Clock()
    state = SubscriptionState("t", checks_row=True, clock=clock)
    subscribed(state, [entry(1, ev.QUEUED)])
    clock.now += ROW_CHECK_S
    state.next()
    state.take_row(Row("failed", error_code="model.timeout", error_message="slow"))
    state.next()
    state.take_log([entry(2, ev.FAILED, error={"code": "model.timeout"})])
    [event] = drain(state)
    assert "from_row" not in event and state.next() is END


def test_a_failed_row_gives_its_error_and_a_seq_past_the_rows_last_seq() -> None:
    clock = Clock()
    state = SubscriptionState("t", from_seq=5, checks_row=True, clock=clock)
    clock.now += ROW_CHECK_S
    assert state.next() is READ_ROW
    row = Row("failed", error_code="model.timeout", error_message="slow", last_seq=9)
    state.take_row(row)
    clock.now += ROW_GRACE_S
    assert state.next() is READ_ROW
    state.take_row(row)
    gap, event = drain(state)  # seqs 6-9 existed and never reached this follower: it says so
    assert gap["type"] == ev.STREAM_GAP and (gap["from_seq"], gap["to_seq"]) == (6, 9)
    assert event["seq"] == 10 and event["error"] == {"code": "model.timeout", "message": "slow", "retryable": True}


def test_with_a_row_a_lost_redis_is_waited_for_and_the_row_still_ends_it() -> None:
    clock = Clock()
    state = SubscriptionState("t", checks_row=True, clock=clock)
    error = redis.ConnectionError("down")
    for _ in range(MAX_RECONNECTS * 3):  # Redis down for long: keeps trying, never raises
        action = state.next()
        if action is READ_ROW:
            state.take_row(Row("running"))
            continue
        if isinstance(action, Sleep):
            assert action.seconds <= 2.0
            clock.now += action.seconds
            continue
        assert action is SUBSCRIBE
        state.connection_lost(error)
    for _ in range(20):
        action = state.next()
        if action is READ_ROW:
            state.take_row(Row("cancelled"))
        elif isinstance(action, Sleep):
            clock.now += action.seconds
        elif isinstance(action, Deliver):
            assert action.event["type"] == ev.CANCELLED and action.event["from_row"]
            break
        else:
            state.connection_lost(error)
    else:
        raise AssertionError("the row never ended the subscription")


def test_without_a_row_a_lost_redis_raises_after_max_reconnects() -> None:
    clock = Clock()
    state = SubscriptionState("t", clock=clock)
    error = redis.ConnectionError("down")
    with pytest.raises(redis.ConnectionError):
        for _ in range(100):
            action = state.next()
            if isinstance(action, Sleep):
                clock.now += action.seconds
            else:
                state.connection_lost(error)


def test_a_lost_connection_mid_read_rereads_from_the_settled_cursor() -> None:
    from contracts.bus.subscription import READ_BATCH

    state = SubscriptionState("t", clock=Clock())
    subscribed(state, [entry(1, ev.QUEUED)])
    state.take_message(None)
    state.next()
    state.take_log([entry(n, ev.ANSWER_DELTA, text="x") for n in range(2, 2 + READ_BATCH)])  # a full batch
    state.connection_lost(redis.ConnectionError("lost"))
    while not isinstance(action := state.next(), ReadLog):
        if action is SUBSCRIBE:
            state.subscribed()
        else:
            state._resume_at = 0  # skip the back-off
    assert action.start == "(1-0"  # nothing of the unfinished read was taken


def test_heartbeats_come_after_each_quiet_period_and_not_while_events_flow() -> None:
    from contracts.bus.subscription import HEARTBEAT

    clock = Clock()
    state = SubscriptionState("t", heartbeat_s=15, clock=clock)
    subscribed(state, [entry(1, ev.QUEUED)])
    action = state.next()
    assert isinstance(action, WaitLive) and action.timeout <= 1.0
    clock.now += 10
    state.take_message(live(2, ev.STARTED))
    assert len(drain(state)) == 1
    clock.now += 10  # 10 s since the last event: no heartbeat yet
    assert state.next() is not HEARTBEAT
    state.take_log([])
    clock.now += 5
    assert state.next() is HEARTBEAT
    assert state.next() is not HEARTBEAT  # the next one is due 15 s later
