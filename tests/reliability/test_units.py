"""Unit tests without a broker: backoff, the classification of model errors, the delivery settings
check, the retry decision against the time limit, and the task lease on a real Redis."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
import redis

from contracts.errors import ConfigError, ModelError
from contracts.events import lease_key
from contracts.settings import Settings
from worker.app import app, celery_config, delivery_problems, restore_interval_s
from worker.lease import LeaseKeeper
from worker.model import map_error
from worker.pipeline import TaskRun, backoff_s

REQUEST = httpx.Request("POST", "https://dashscope.example/compatible-mode/v1/chat/completions")


# -- backoff ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 10])
@pytest.mark.parametrize("retry_after", [0.5, 3.0, 7.25, 100.0])
def test_backoff_is_never_shorter_than_retry_after(attempt: int, retry_after: float) -> None:
    for _ in range(50):
        assert backoff_s(attempt, retry_after, 1.0, 60.0) >= retry_after


def test_backoff_is_exponential_capped_and_jittered() -> None:
    for attempt in range(1, 12):
        ceiling = min(60.0, 1.0 * 2 ** (attempt - 1))
        draws = [backoff_s(attempt, None, 1.0, 60.0) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws), (attempt, min(draws), max(draws))
        assert len(set(draws)) > 20  # jittered: workers that failed together do not retry together
    assert max(backoff_s(30, None, 1.0, 60.0) for _ in range(200)) <= 60.0
    assert backoff_s(1, 0.0, 0.05, 2.0) <= 0.05


# -- map_error -------------------------------------------------------------------------------------
def _status_error(status: int, message: str, code: str = "", headers: dict[str, str] | None = None) -> Any:
    response = httpx.Response(status, headers=headers or {}, request=REQUEST,
                              json={"error": {"message": message, "code": code}})
    kinds = {400: openai.BadRequestError, 401: openai.AuthenticationError, 403: openai.PermissionDeniedError,
             404: openai.NotFoundError, 429: openai.RateLimitError, 500: openai.InternalServerError}
    kind = kinds.get(status, openai.APIStatusError)
    return kind(message, response=response, body={"error": {"message": message, "code": code}})


@pytest.mark.parametrize(("exc", "started", "code", "retryable"), [
    (_status_error(429, "Requests rate limit exceeded, please try again later.", "Throttling.RateQuota"),
     False, "model.rate_limited", True),
    (_status_error(429, "Free allocated quota exceeded.", "AllocationQuota.FreeTierOnly"),
     False, "model.rate_limited", False),
    (_status_error(429, "Access denied, please make sure your account is in good standing (Arrearage)."),
     False, "model.rate_limited", False),
    (_status_error(500, "An internal error has occured, please try again later.", "InternalError"),
     False, "model.unavailable", True),
    (_status_error(503, "The model is unavailable.", "ModelUnavailable"), False, "model.unavailable", True),
    (_status_error(400, "Input data may contain inappropriate content.", "data_inspection_failed"),
     False, "model.rejected", False),
    (_status_error(400, "This model only support stream mode.", "invalid_parameter_error"),
     False, "model.rejected", False),
    (_status_error(401, "Incorrect API key provided.", "invalid_api_key"), False, "model.rejected", False),
    (_status_error(404, "The model does not exist.", "model_not_found"), False, "model.rejected", False),
    (_status_error(408, "Request timed out."), False, "model.timeout", True),
    (openai.APITimeoutError(REQUEST), False, "model.timeout", True),
    (openai.APIConnectionError(request=REQUEST), False, "model.unavailable", True),
    (openai.APIConnectionError(request=REQUEST), True, "model.stream_broken", True),
    (httpx.ReadTimeout("no data", request=REQUEST), True, "model.timeout", True),
    (httpx.RemoteProtocolError("peer closed connection without sending complete message body"), True,
     "model.stream_broken", True),
    (httpx.ConnectError("connection refused"), False, "model.unavailable", True),
    (openai.APIError("An error occurred during streaming", REQUEST, body=None), True, "model.stream_broken", True),
])
def test_map_error_classifies_model_failures(exc: BaseException, started: bool, code: str, retryable: bool) -> None:
    error = map_error(exc, started=started)
    assert isinstance(error, ModelError)
    assert (error.code, error.retryable) == (code, retryable), error


def test_map_error_reads_retry_after() -> None:
    error = map_error(_status_error(429, "slow down", headers={"retry-after": "7"}), started=False)
    assert error.retry_after_s == 7.0
    assert map_error(_status_error(503, "busy", headers={"retry-after": "2.5"}), started=False).retry_after_s == 2.5
    assert map_error(_status_error(429, "slow down", headers={"retry-after": "soon"}), started=False).retry_after_s is None
    assert map_error(_status_error(429, "slow down"), started=False).retry_after_s is None


# -- the retry decision ----------------------------------------------------------------------------
def _run(attempt: int = 1, retry_base: int = 0, **settings: Any) -> TaskRun:
    run = TaskRun.__new__(TaskRun)
    run.ctx = SimpleNamespace(settings=Settings(**settings))  # type: ignore[assignment]
    run.attempt, run.retry_base = attempt, retry_base
    return run


def test_no_retry_when_retry_after_would_pass_the_time_limit() -> None:
    error = ModelError("429 slow down", code="model.rate_limited", retry_after_s=30.0)
    watch = SimpleNamespace(remaining_s=lambda: 10.0, should_stop=lambda: False)
    with pytest.raises(ModelError) as raised:
        _run()._before_retry(error, watch)
    assert raised.value is error and error.retryable


def test_no_retry_past_the_attempt_cap_counted_from_the_last_manual_retry() -> None:
    error = ModelError("503", code="model.unavailable")
    watch = SimpleNamespace(remaining_s=lambda: 100.0, should_stop=lambda: False)
    with pytest.raises(ModelError):
        _run(attempt=4, retry_base=0)._before_retry(error, watch)
    with pytest.raises(ModelError):
        _run(attempt=8, retry_base=4)._before_retry(error, watch)
    rejected = ModelError("400", code="model.rejected")
    with pytest.raises(ModelError):
        _run(attempt=1)._before_retry(rejected, watch)


# -- delivery settings -----------------------------------------------------------------------------
def test_the_worker_configuration_keeps_the_delivery_guarantees() -> None:
    settings = Settings(visibility_timeout_s=12, task_timeout_s=6)
    conf = celery_config(settings)
    assert delivery_problems(conf, settings) == []
    assert conf["task_acks_late"] and conf["task_reject_on_worker_lost"] and conf["worker_prefetch_multiplier"] == 1
    assert conf["broker_connection_retry"] and conf["broker_connection_max_retries"] is None
    options = conf["broker_transport_options"]
    assert options["visibility_timeout"] == 12 and options["unacked_restore_interval"] == 3
    assert options["unacked_restore_throttle"] == 1
    assert delivery_problems(app.conf, Settings()) == []  # the app the worker runs, default settings


def test_delivery_problems_name_what_is_wrong() -> None:
    settings = Settings(visibility_timeout_s=7200, task_timeout_s=1800)
    good = celery_config(settings)
    assert any("acks_late" in p for p in delivery_problems({**good, "task_acks_late": False}, settings))
    assert any("reject_on_worker_lost" in p
               for p in delivery_problems({**good, "task_reject_on_worker_lost": False}, settings))
    assert any("prefetch_multiplier is 4" in p for p in delivery_problems({**good, "worker_prefetch_multiplier": 4}, settings))
    short = {**good, "broker_transport_options": {"visibility_timeout": 600}}
    problems = delivery_problems(short, settings)
    assert any("differs from QVQ_VISIBILITY_TIMEOUT_S" in p for p in problems)
    assert any("must exceed QVQ_TASK_TIMEOUT_S" in p for p in problems)
    assert any("kombu's default" in p for p in delivery_problems({**good, "broker_transport_options": {}}, settings))


def test_restore_sweep_period_follows_the_visibility_timeout() -> None:
    assert [restore_interval_s(v) for v in (2, 8, 12, 40, 7200)] == [1, 2, 3, 10, 10]


def test_settings_refuse_a_visibility_timeout_not_above_the_task_limit() -> None:
    with pytest.raises(ConfigError, match="QVQ_VISIBILITY_TIMEOUT_S"):
        Settings.from_env({"QVQ_VISIBILITY_TIMEOUT_S": "60", "QVQ_TASK_TIMEOUT_S": "60"})
    assert Settings.from_env({"QVQ_LEASE_TTL_S": "2.5"}).lease_ttl_s == 2.5
    with pytest.raises(ConfigError, match="QVQ_LEASE_TTL_S"):
        Settings.from_env({"QVQ_LEASE_TTL_S": "0"})


# -- the task lease --------------------------------------------------------------------------------
def test_a_lease_has_one_holder_until_released(redis_client: redis.Redis) -> None:
    first = LeaseKeeper(redis_client, ttl_s=5, owner="w1")
    second = LeaseKeeper(redis_client, ttl_s=5, owner="w2")
    try:
        lease = first.try_acquire("t1")
        assert lease is not None and lease.guarded
        assert second.try_acquire("t1") is None
        assert (second.holder("t1") or "").startswith("w1:")
        second.release(lease.__class__("t1", "not-the-token"))  # someone else's token: no effect
        assert second.try_acquire("t1") is None
        first.release(lease)
        assert second.try_acquire("t1") is not None
    finally:
        first.stop()
        second.stop()


def test_a_lease_is_renewed_recreated_after_a_redis_loss_and_reported_when_taken_over(
    redis_client: redis.Redis,
) -> None:
    keeper = LeaseKeeper(redis_client, ttl_s=0.6, owner="w1")
    try:
        lease = keeper.try_acquire("t2")
        assert lease is not None
        time.sleep(1.0)  # longer than the TTL: only renewals keep it
        assert redis_client.get(lease_key("t2")) == lease.token.encode()
        redis_client.delete(lease_key("t2"))  # what a Redis restart without persistence does
        keeper.renew_all()
        assert redis_client.get(lease_key("t2")) == lease.token.encode()

        lost: list[str] = []
        lease.on_lost = lambda: lost.append("lost")
        redis_client.set(lease_key("t2"), "w2:other")  # another delivery took it over
        keeper.renew_all()
        assert lease.lost and lost == ["lost"]
        keeper.release(lease)
        assert redis_client.get(lease_key("t2")) == b"w2:other"  # not ours to delete
    finally:
        keeper.stop()


def test_without_redis_a_lease_is_granted_unguarded() -> None:
    client = redis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.2)
    keeper = LeaseKeeper(client, ttl_s=5, owner="w1")
    try:
        lease = keeper.try_acquire("t3")
        assert lease is not None and not lease.guarded
        keeper.renew_all()  # logs and carries on
        assert not lease.lost
    finally:
        keeper.stop()


# -- Celery tells the truth ------------------------------------------------------------------------
def test_celery_sends_task_events_and_acknowledges_a_failure() -> None:
    conf = celery_config(Settings())
    assert conf["worker_send_task_events"] and conf["task_send_sent_event"]
    assert conf["task_acks_on_failure_or_timeout"] is True


# -- retry policies --------------------------------------------------------------------------------
def test_a_policy_retries_its_errors_then_gives_up_with_the_last_one() -> None:
    import dataclasses

    import sqlalchemy as sa

    from contracts import retry

    policy = dataclasses.replace(retry.DATABASE, delays=(0.0, 0.0))
    calls: list[int] = []

    def flaky(fail_times: int) -> str:
        calls.append(1)
        if len(calls) <= fail_times:
            raise sa.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("gone"))
        return "ok"

    assert policy.call(flaky, 2) == "ok" and len(calls) == 3
    calls.clear()
    with pytest.raises(sa.exc.OperationalError):
        policy.call(flaky, 5)
    assert len(calls) == 3  # one try, then one per wait
    with pytest.raises(ValueError):  # not a transient error: no retry
        policy.call(lambda: (_ for _ in ()).throw(ValueError("a bug")))


# -- messages --------------------------------------------------------------------------------------
def test_a_message_is_checked_against_its_task_row() -> None:
    from contracts.job import message_for, parse_job
    from worker.message import load_record

    job = parse_job({"images": ["s3://b/k.png"], "prompt": "What is it?", "task_id": "t-1"})
    row = SimpleNamespace(id="t-1", run=1, request=job.to_payload())
    rows = SimpleNamespace(get=lambda task_id: row if task_id == "t-1" else None)
    assert load_record(message_for("t-1", 1), rows) is row  # type: ignore[arg-type]
    assert load_record(job.to_payload(), rows) is row  # type: ignore[arg-type]  # old format, same request
    for refused in (message_for("t-1", 0), message_for("t-2", 1), job.to_payload() | {"prompt": "Other"},
                    {"version": 7, "task_id": "t-1"}, ["t-1"]):
        assert load_record(refused, rows) is None  # type: ignore[arg-type]
    assert load_record(message_for("t-1", 1), rows, delivery_id="t-9") is None  # type: ignore[arg-type]
