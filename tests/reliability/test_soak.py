"""Soak: many tasks at once, about one in ten with an injected fault; every task ends exactly once.
Default: 60 tasks; QVQ_SLOW=1: 500."""

from __future__ import annotations

import random
import time
from collections import Counter

import pytest

from contracts import events as ev
from tests.reliability import SLOW, Stack, terminal_events

pytestmark = pytest.mark.timeout(600)

FAULTS = {  # plan -> the status the task must end in
    "429@1": "completed", "500@1": "completed", "503@1": "completed", "cut:8@1": "completed",
    "stall@1": "completed", "400": "failed",
}


@pytest.mark.slow
def test_soak_every_task_terminal_no_duplicates_no_losses(stack: Stack) -> None:
    total = 500 if SLOW else 60
    rng = random.Random(6)
    plans: dict[str, str | None] = {}
    started = time.monotonic()
    for n in range(total):
        plan = rng.choice(list(FAULTS)) if rng.random() < 0.10 else None
        fields = {"tps": 400, "reasoning_tokens": 30, "retry_after_s": 0.2}
        task_id = stack.submit(f"Soak task {n}.", **({"fault": plan} if plan else {}), **fields)
        plans[task_id] = plan
    submitted = time.monotonic() - started
    records = stack.wait_terminal(list(plans), timeout=300 if SLOW else 90)
    elapsed = time.monotonic() - started

    statuses = Counter(r.status for r in records.values())
    terminal_counts = {task_id: len(terminal_events(stack.events(task_id))) for task_id in plans}
    # the ledger has a row per billed attempt (a cut or stalled stream was billed too): never two for one
    bills = {task_id: [b["attempt"] for b in stack.client.store.usage_rows(task_id)] for task_id in plans}
    lost = total - len(records)
    duplicates = (sum(1 for n in terminal_counts.values() if n > 1)
                  + sum(1 for attempts in bills.values() if len(set(attempts)) != len(attempts)))
    faulted = sum(1 for plan in plans.values() if plan)
    retried = sum(1 for r in records.values() if r.attempts > 1)
    print(f"\nsoak: {total} tasks ({faulted} with an injected fault), {dict(statuses)}, {retried} retried, "
          f"lost {lost}, duplicates {duplicates}, missing terminal events "
          f"{sum(1 for n in terminal_counts.values() if n == 0)}; submitted in {submitted:.1f} s, "
          f"all terminal in {elapsed:.1f} s")

    assert lost == 0 and duplicates == 0
    assert all(n == 1 for n in terminal_counts.values())
    for task_id, plan in plans.items():
        record = records[task_id]
        expected = FAULTS[plan] if plan else "completed"
        assert record.status == expected, (plan, record.status, record.error_code, record.error_message)
        if expected == "completed":
            assert record.attempts in bills[task_id] and all(a <= record.attempts for a in bills[task_id])
        else:
            assert bills[task_id] == []
        if plan and expected == "completed":  # one retry, or more when a loaded machine stalls a stream too
            assert record.attempts >= 2, (plan, record.attempts)
        (terminal,) = terminal_events(stack.events(task_id))
        assert terminal["type"] == (ev.COMPLETED if expected == "completed" else ev.FAILED)
    assert stack.client.store.list_tasks(status="running") == []
    stack.wait_no_active_streams(timeout=3)
