"""The model-call hook (worker/flow.py) on its own: waits publish task.waiting and end on cancel, a budget
refusal makes no call, every billed outcome reaches the ledger and the budget."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis

from contracts.catalog import cost_decimal
from contracts.errors import BudgetError, ModelError
from contracts.events import WAITING
from contracts.job import JobRequest
from contracts.settings import Settings
from contracts.store import Store
from worker.flow.control import FlowControl
from worker.stream.model import StreamResult, StreamStopped


def _control(redis_url: str, tmp_path: Path, **env: str) -> tuple[FlowControl, Store]:
    settings = Settings.from_env({"REDIS_URL": redis_url, "DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}", **env})
    store = Store.from_url(settings.database_url)
    return FlowControl(settings, redis.Redis.from_url(redis_url), store), store


def _job(store: Store, task_id: str, tenant: str = "t") -> JobRequest:
    job = JobRequest(task_id=task_id, model="qvq-max", images=("x.png",), prompt="p", tenant=tenant)
    store.create_task(job)
    return job


def _finished(prompt: int, completion: int) -> StreamResult:
    result = StreamResult(usage={"prompt_tokens": prompt, "completion_tokens": completion})
    return result


def test_a_tenant_rate_wait_is_published_and_ends_on_cancel(redis_client: redis.Redis, redis_url: str,
                                                             tmp_path: Path) -> None:
    control, store = _control(redis_url, tmp_path, QVQ_TENANT_LIMITS=json.dumps({"t": {"rpm": 1}}))
    job = _job(store, "r1")
    with control.model_call(job, 1, 100, lambda: False, lambda *a, **k: None) as call:
        call.finished(_finished(100, 10))
    published: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(StreamStopped), control.model_call(job, 2, 100, lambda: bool(published),
                                                          lambda t, **f: published.append((t, f))):
        pass
    ((type_, fields),) = published
    assert type_ == WAITING and fields["reason"] == "tenant_rate" and 50 < fields["wait_s"] <= 60


def test_a_model_quota_wait_is_published(redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    control, store = _control(redis_url, tmp_path, QVQ_MODEL_LIMITS=json.dumps({"qvq-max": {"rpm": 60}}))
    job = _job(store, "q1")
    with control.model_call(job, 1, 100, lambda: False, lambda *a, **k: None):
        pass  # the call went (and produced nothing billable)
    published: list[tuple[str, dict[str, Any]]] = []
    with pytest.raises(StreamStopped), control.model_call(job, 2, 100, lambda: bool(published),
                                                          lambda t, **f: published.append((t, f))):
        pass
    assert published[0][0] == WAITING and published[0][1]["reason"] == "model_quota"


def test_over_budget_makes_no_call_and_leaves_no_bill(redis_client: redis.Redis, redis_url: str,
                                                      tmp_path: Path) -> None:
    control, store = _control(redis_url, tmp_path,
                              QVQ_TENANT_LIMITS=json.dumps({"*": {"monthly_budget_cny": "0.5"}}))
    job = _job(store, "b1", tenant="anyone")
    entered = False
    with pytest.raises(BudgetError, match="monthly budget of 0.5 CNY"), \
            control.model_call(job, 1, 100, lambda: False, lambda *a, **k: None):
        entered = True
    assert not entered and store.usage_rows("b1") == []


def test_every_billed_outcome_reaches_the_ledger_and_the_budget(redis_client: redis.Redis, redis_url: str,
                                                                tmp_path: Path) -> None:
    control, store = _control(redis_url, tmp_path, QVQ_TENANT_LIMITS=json.dumps({"t": {"daily_budget_cny": "10"}}))
    job = _job(store, "l1")
    with pytest.raises(ModelError), control.model_call(job, 1, 100, lambda: False, lambda *a, **k: None) as call:
        call.on_open(lambda _: None)(object())
        call.tap(lambda *_: None)("reasoning", "some thinking text")
        raise ModelError("the stream broke", code="model.stream_broken")
    with pytest.raises(ModelError), control.model_call(job, 2, 100, lambda: False, lambda *a, **k: None):
        raise ModelError("429", code="model.rate_limited", retry_after_s=0.2)  # never opened: not billed
    with control.model_call(job, 3, 100, lambda: False, lambda *a, **k: None) as call:
        call.finished(_finished(120, 40))
    rows = {row["attempt"]: row for row in store.usage_rows("l1")}
    assert sorted(rows) == [1, 3]
    assert rows[1]["outcome"] == "failed" and rows[1]["estimated"] and rows[1]["completion_tokens"] > 0
    assert rows[3]["outcome"] == "completed" and not rows[3]["estimated"]
    assert rows[3]["total_cost"] == cost_decimal("qvq-max", 120, 40)["total"]
    state = control.budget.state("t")["daily"]
    assert Decimal(state["spent"] or 0) == rows[1]["total_cost"] + rows[3]["total_cost"]
    assert Decimal(state["reserved"] or 0) == 0


def test_the_end_of_a_wait_is_observed_by_reason_and_its_marker_removed(
        redis_client: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    from contracts import flow
    from contracts.metrics import WORKER_REGISTRY as REGISTRY

    def waits() -> float:
        return REGISTRY.get_sample_value("qvq_flow_wait_seconds_count", {"reason": "model_quota"}) or 0.0

    control, store = _control(redis_url, tmp_path, QVQ_MODEL_LIMITS=json.dumps({"qvq-max": {"rpm": 60}}))
    job = _job(store, "w1")
    with control.model_call(job, 1, 100, lambda: False, lambda *a, **k: None):
        pass
    before = waits()
    published: list[str] = []
    with control.model_call(job, 2, 100, lambda: False, lambda t, **f: published.append(t)):
        assert published and set(published) == {WAITING}  # it waited (about 1 s at 60 RPM), then went
        assert flow.read_waiting(redis_client, "w1") is None
    assert waits() == before + 1
