"""The bill on the task: every billed attempt of it, summed from the ledger, the same on every surface
(the row, task.completed, GET /v1/tasks/{id}, `qvq result --json`, Python's TaskRecord), money as exact
decimal strings in JSON and Decimal in Python."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from decimal import Decimal
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator

from contracts import events as ev
from contracts.settings import Settings
from tests.producer import ApiServer
from tests.reliability import Stack, terminal_events

pytestmark = pytest.mark.timeout(180)
MONEY = r"^[0-9]+\.[0-9]{6}$"


def test_a_failed_billed_attempt_then_a_success_are_both_on_the_bill(make_stack: Any) -> None:
    stack: Stack = make_stack(QVQ_FLOW_CONTROL="1")
    stack.start_worker(concurrency=2)
    task_id = stack.submit("Cut once, then answer.", fault="cut:12@1", tps=200)
    record = stack.wait_terminal([task_id], timeout=60)[task_id]
    assert record.status == "completed" and record.attempts == 2
    ledger = stack.client.store.usage_rows(task_id)
    assert [row["attempt"] for row in ledger] == [1, 2]
    total = sum((Decimal(str(row["total_cost"])) for row in ledger), Decimal(0))

    # Python: Decimal; the sum of both attempts, each listed
    assert isinstance(record.cost["total"], Decimal) and record.cost["total"] == total
    assert [a["attempt"] for a in record.cost["attempts"]] == [1, 2]
    assert [a["outcome"] for a in record.cost["attempts"]][-1] == "completed"
    assert record.usage["billed"]["attempts"] == 2
    assert record.usage["billed"]["total_tokens"] == sum(row["total_tokens"] for row in ledger)
    assert record.usage["total_tokens"] == ledger[-1]["total_tokens"]  # the final attempt's own

    # the terminal event: the same bill, as text
    (completed,) = terminal_events(stack.events(task_id))
    assert completed["type"] == ev.COMPLETED and completed["cost"]["total"] == f"{total:.6f}"
    assert len(completed["cost"]["attempts"]) == 2 and completed["usage"]["billed"]["attempts"] == 2

    # the API and the CLI: exact decimal strings
    with ApiServer(Settings.from_env(stack.env)) as api:
        shown = httpx.get(f"{api.url}/v1/tasks/{task_id}", timeout=30).json()
        listed = httpx.get(f"{api.url}/v1/tasks", timeout=30).json()
        document = httpx.get(f"{api.url}/openapi.json", timeout=30).json()
    for name, body in (("TaskRecord", shown), ("TaskList", listed)):  # decimal strings and zoned times, as typed
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER).validate(body)
    assert shown["created_at"].endswith("Z") and listed["tasks"][0]["cost"]["total"] == f"{total:.6f}"
    assert shown["cost"]["total"] == f"{total:.6f}" and shown["cost"]["attempts"][0]["cost"].count(".") == 1
    for name in ("input", "output", "total"):
        assert re.fullmatch(MONEY, shown["cost"][name]), shown["cost"]
    done = subprocess.run([sys.executable, "-m", "producer.cli", "result", task_id, "--json"], capture_output=True,
                          text=True, env={**os.environ, **stack.env, "LOG_LEVEL": "WARNING"}, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["cost"]["total"] == f"{total:.6f}"
