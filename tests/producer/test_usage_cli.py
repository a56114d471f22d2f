"""`qvq usage` and `qvq limits` as a user runs them: the ledger's rows and totals, filters, JSON and CSV,
and the limiter's state read from Redis."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import subprocess
import sys
from decimal import Decimal
from typing import Any

import pytest
import redis

from contracts import keys
from contracts.job import JobRequest
from contracts.settings import Settings
from contracts.store import Store

pytestmark = pytest.mark.timeout(120)


@pytest.fixture()
def qvq(service_env: dict[str, str]) -> Any:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "producer.cli", *args], capture_output=True, text=True,
                              env={**os.environ, **service_env, "LOG_LEVEL": "WARNING", **(env or {})}, timeout=90)
        assert done.returncode == 0, (done.stdout, done.stderr)
        return done

    return run


def _ledger(service_env: dict[str, str]) -> Store:
    store = Store.from_url(service_env["DATABASE_URL"])
    for index, (tenant, outcome, estimated) in enumerate(
            [("acme", "completed", False), ("acme", "cancelled", True), ("bolt", "failed", True)]):
        job = JobRequest(task_id=f"u{index}", model="qvq-max", images=("x.png",), prompt="p", tenant=tenant)
        store.create_task(job)
        store.record_usage(job.task_id, 1, model="qvq-max", tenant=tenant, prompt_tokens=1000 + index,
                           completion_tokens=333, estimated=estimated, outcome=outcome)
    return store


def test_usage_totals_equal_the_sum_of_the_ledger_rows(qvq: Any, service_env: dict[str, str]) -> None:
    store = _ledger(service_env)
    report = json.loads(qvq("usage", "--by", "tenant", "--json").stdout)
    assert [row["tenant"] for row in report["rows"]] == ["acme", "bolt"]
    assert report["total"]["calls"] == 3 and report["total"]["estimated_calls"] == 2
    ledger = [row for task in ("u0", "u1", "u2") for row in store.usage_rows(task)]
    assert Decimal(report["total"]["cost_cny"]) == sum(row["total_cost"] for row in ledger)
    assert report["total"]["total_tokens"] == sum(row["total_tokens"] for row in ledger)

    only_acme = json.loads(qvq("usage", "--tenant", "acme", "--json").stdout)
    assert only_acme["total"]["calls"] == 2
    future = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).isoformat()
    assert json.loads(qvq("usage", "--since", future, "--json").stdout)["rows"] == []
    assert json.loads(qvq("usage", "--until", future, "--json").stdout)["total"]["calls"] == 3

    table = list(csv.reader(io.StringIO(qvq("usage", "--by", "tenant", "--csv").stdout)))
    assert table[0][0] == "tenant" and table[-1][0] == "total"
    assert Decimal(table[-1][-1]) == Decimal(report["total"]["cost_cny"])


def test_limits_show_the_limiters_windows_and_waiters(qvq: Any, service_env: dict[str, str]) -> None:
    limits = json.dumps({"qvq-max": {"rpm": 120, "tpm": 600000}})
    from worker.flow.limiter import ModelLimiter

    client = redis.Redis.from_url(service_env["REDIS_URL"])
    settings = Settings.from_env({**service_env, "QVQ_MODEL_LIMITS": limits})
    limiter = ModelLimiter(client, settings.model_limits)
    assert limiter.acquire("qvq-max", limiter.new_ticket(), tenant="a", tokens=700).go
    limiter.acquire("qvq-max", limiter.new_ticket(), tenant="a", tokens=10)  # 2/s: goes too
    limiter.acquire("qvq-max", "00000000000000009-w", tenant="a", tokens=10)  # 3rd this second: waits
    shown = json.loads(qvq("limits", "--json", env={"QVQ_MODEL_LIMITS": limits}).stdout)
    (row,) = [r for r in shown["families"] if r["family"] == "qvq-max"]
    assert shown["limiter"] is True
    assert row["requests_60s"] == 2 and row["rps"] == 2 and row["rpm"] == 120  # (the CLI starts in > 1 s)
    assert row["tokens_60s"] == 710 and row["tpm"] == 600000 and row["waiting"] == 1
    assert "2/120" in qvq("limits", env={"QVQ_MODEL_LIMITS": limits}).stdout
    client.delete(keys.waiters_key("qvq-max"))
