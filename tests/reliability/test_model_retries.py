"""Model-call retries through a real worker and the emulator's injected faults (X-Qvq-Attempt picks
the attempt a fault applies to): retried faults complete on the next attempt with only that attempt's
text; rejections are not retried; an exhausted budget fails once, retryable; the time limit ends a
runaway stream."""

from __future__ import annotations

import uuid

import pytest

from contracts import events as ev
from tests.reliability import Stack, after_last_retry, terminal_events, text_of

pytestmark = pytest.mark.timeout(120)

RETRIED = {  # fault plan -> the error code of the failed attempt
    "429@1": "model.rate_limited",
    "500@1": "model.unavailable",
    "cut:12@1": "model.stream_broken",
    "stall@1": "model.timeout",  # no chunk for QVQ_STALL_TIMEOUT_S=1
}
RETRY_AFTER_S = 0.4


def test_each_fault_on_attempt_1_completes_on_attempt_2_with_only_its_text(stack: Stack) -> None:
    prompt = f"Which colour is it? ({uuid.uuid4().hex[:8]})"
    size = {"reasoning_tokens": 20, "answer_tokens": 10}  # the cut plan's two attempts fit the 6 s limit on a busy machine
    control = stack.submit(prompt, tps=100, **size)  # same prompt and length, no fault: the text to expect
    # The cut plan runs at 25 chunks/s: its 12 chunks span many 20 ms coalescing windows, so some of its text
    # is published before the cut even on a loaded machine (text still buffered when an attempt fails is
    # dropped with it, by design: a burst of all 12 inside one window would publish nothing).
    ids = {plan: stack.submit(prompt, fault=plan, tps=25 if plan.startswith("cut") else 100,
                              retry_after_s=RETRY_AFTER_S, **size) for plan in RETRIED}
    records = stack.wait_terminal([control, *ids.values()], timeout=40)
    expected = records[control]
    assert expected.status == "completed" and expected.attempts == 1

    for plan, task_id in ids.items():
        record, events = records[task_id], stack.events(task_id)
        assert record.status == "completed", (plan, record.error_code, record.error_message)
        assert record.attempts == 2, plan
        retrying = [e for e in events if e["type"] == ev.RETRYING]
        assert len(retrying) == 1, plan
        assert retrying[0]["attempt"] == 2 and retrying[0]["error"]["code"] == RETRIED[plan], retrying
        assert retrying[0]["delay_s"] > 0

        final = after_last_retry(events)
        assert text_of(final, ev.REASONING_DELTA) == record.reasoning == expected.reasoning, plan
        assert text_of(final, ev.ANSWER_DELTA) == record.answer == expected.answer, plan
        assert all(e["attempt"] == 2 for e in final), plan
        (terminal,) = terminal_events(events)
        assert terminal["type"] == ev.COMPLETED and terminal["attempt"] == 2
        assert terminal["reasoning"] == expected.reasoning and terminal["answer"] == expected.answer
        assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
        bills = stack.client.store.usage_rows(task_id)
        # the ledger has every billed attempt: a stream that opened and broke is billed (estimated)
        if plan.startswith("stall"):  # a stall may come before the stream opened (nothing to bill) or after
            assert [b["attempt"] for b in bills] in ([1, 2], [2]), plan
        else:  # a cut stream opened and was billed; a refused request (429, 5xx) never opened
            assert [b["attempt"] for b in bills] == ([1, 2] if plan.startswith("cut") else [2]), plan
        assert [b["estimated"] for b in bills] == [True] * (len(bills) - 1) + [False], plan

    # 429: Retry-After honoured; the next attempt's first text came no sooner.
    events_429 = stack.events(ids["429@1"])
    retry = next(e for e in events_429 if e["type"] == ev.RETRYING)
    assert retry["delay_s"] >= RETRY_AFTER_S
    first_text = next(e for e in after_last_retry(events_429) if e["type"] in ev.DELTA_TYPES)
    assert first_text["ts"] - retry["ts"] >= RETRY_AFTER_S - 0.02

    # cut: the broken attempt had published text, which task.retrying voided.
    events_cut = stack.events(ids["cut:12@1"])
    before = events_cut[: events_cut.index(next(e for e in events_cut if e["type"] == ev.RETRYING))]
    partial = text_of(before, ev.REASONING_DELTA)
    assert partial and expected.reasoning.startswith(partial) and len(partial) < len(expected.reasoning)
    assert text_of(events_cut, ev.REASONING_DELTA) == partial + expected.reasoning


@pytest.mark.parametrize("plan", ["400", "inspect"])
def test_rejections_fail_at_once_not_retryable(stack: Stack, plan: str) -> None:
    requests_before = stack.stats()["requests"]
    task_id = stack.submit("Is this allowed?", fault=plan)
    record = stack.wait_terminal([task_id], timeout=20)[task_id]
    events = stack.events(task_id)
    assert record.status == "failed" and record.error_code == "model.rejected" and record.attempts == 1
    assert not [e for e in events if e["type"] == ev.RETRYING]
    (terminal,) = terminal_events(events)
    assert terminal["type"] == ev.FAILED
    assert terminal["error"]["code"] == "model.rejected" and terminal["error"]["retryable"] is False
    assert stack.stats()["requests"] - requests_before == 1
    assert stack.client.store.usage_rows(task_id) == []


@pytest.mark.parametrize("plan", ["503", "cut:4"])
def test_every_attempt_failing_ends_in_one_retryable_failure_and_nothing_running(stack: Stack, plan: str) -> None:
    task_id = stack.submit("Will this ever work?", fault=plan, tps=200)
    record = stack.wait_terminal([task_id], timeout=30)[task_id]
    events = stack.events(task_id)
    assert record.status == "failed" and record.attempts == 4  # QVQ_MAX_ATTEMPTS default
    assert record.error_code == ("model.unavailable" if plan == "503" else "model.stream_broken")
    retrying = [e for e in events if e["type"] == ev.RETRYING]
    assert [e["attempt"] for e in retrying] == [2, 3, 4]
    (terminal,) = terminal_events(events)
    assert terminal["type"] == ev.FAILED and terminal["attempt"] == 4
    assert terminal["error"]["code"] == record.error_code and terminal["error"]["retryable"] is True
    assert stack.client.store.list_tasks(status="running") == []
    # every attempt whose stream opened was billed (our estimate): in the ledger; 503s never opened
    bills = stack.client.store.usage_rows(task_id)
    assert [b["attempt"] for b in bills] == ([] if plan == "503" else [1, 2, 3, 4])
    assert all(b["estimated"] and b["outcome"] == "failed" for b in bills)
    stack.wait_no_active_streams(timeout=2)


def test_the_task_time_limit_ends_a_runaway_stream(stack: Stack) -> None:
    """QVQ_TASK_TIMEOUT_S=6 in the shared stack; this stream would last about 20 s."""
    task_id = stack.submit("Think for a long time.", tps=20, reasoning_tokens=400)
    events = stack.wait_for_terminal_event(task_id, timeout=20)
    record = stack.wait_terminal([task_id])[task_id]
    assert record.status == "failed" and record.error_code == "model.timeout"
    (terminal,) = terminal_events(events)
    assert terminal["error"] == {"code": "model.timeout", "retryable": False,
                                 "message": terminal["error"]["message"]}
    assert "QVQ_TASK_TIMEOUT_S" in terminal["error"]["message"]
    assert 5.5 <= record.timings["total_s"] <= 10
    assert not [e for e in events if e["type"] == ev.RETRYING]
    stack.wait_no_active_streams(timeout=1.0)  # the HTTP stream was closed, the emulator stopped generating
