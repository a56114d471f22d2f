"""The retry policies, with time patched: no test here sleeps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from structlog.testing import capture_logs

from contracts import retry
from contracts.errors import ImageError, ModelError


@pytest.fixture()
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    slept: list[float] = []
    monkeypatch.setattr(retry, "sleep", slept.append)
    return slept


def failing(errors: list[BaseException], result: Any = "ok") -> Callable[[], Any]:
    """A call raising each of errors in turn, then returning result; counts its calls."""

    def call() -> Any:
        call.calls += 1  # type: ignore[attr-defined]
        if errors:
            raise errors.pop(0)
        return result

    call.calls = 0  # type: ignore[attr-defined]
    return call


def transient_image() -> ImageError:
    return ImageError("HTTP 503", code="image.fetch_failed", ref="https://x/a.png")


@pytest.mark.parametrize(("policy", "delays"), [
    (retry.FETCH, (0.2, 0.6)),
    (retry.CALLBACK, (0.5, 2.0)),
    (retry.DATABASE, (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0)),
    (retry.TERMINAL_PUBLISH, (0.1, 0.3, 1.0, 2.0)),
])
def test_each_policy_declares_its_waits(policy: retry.Policy, delays: tuple[float, ...]) -> None:
    assert policy.delays == delays and policy.attempts == len(delays) + 1


def test_the_database_policy_waits_about_half_a_minute_in_all() -> None:
    assert 25 <= sum(retry.DATABASE.delays) <= 35
    assert retry.DATABASE.delays[0] == 0.2 and retry.DATABASE.delays[-1] == 15.0


def test_fetch_retries_a_retryable_image_error_with_its_waits(waits: list[float]) -> None:
    call = failing([transient_image(), transient_image()], b"png")
    with capture_logs() as logs:
        assert retry.FETCH.call(call) == b"png"
    assert waits == [0.2, 0.6] and call.calls == 3  # type: ignore[attr-defined]
    assert [(e["event"], e["policy"], e["attempt"]) for e in logs] == [
        ("retry.waiting", "fetch", 1), ("retry.waiting", "fetch", 2)]


def test_fetch_gives_up_after_three_tries_with_the_last_error(waits: list[float]) -> None:
    last = transient_image()
    call = failing([transient_image(), transient_image(), last])
    with pytest.raises(ImageError) as caught:
        retry.FETCH.call(call)
    assert caught.value is last and waits == [0.2, 0.6]


@pytest.mark.parametrize("error", [
    ImageError("HTTP 404", code="image.not_found", ref="r"),
    ImageError("bad certificate", code="image.fetch_failed", retryable=False, ref="r"),
    ValueError("a bug"),
])
def test_fetch_does_not_retry_a_permanent_error(waits: list[float], error: Exception) -> None:
    call = failing([error])
    with pytest.raises(type(error)):
        retry.FETCH.call(call)
    assert waits == [] and call.calls == 1  # type: ignore[attr-defined]


def test_callback_retries_a_retry_outcome_and_returns_the_last_one(waits: list[float]) -> None:
    outcomes = iter(["retry", "retry", "retry", "delivered"])
    assert retry.CALLBACK.call(lambda: next(outcomes)) == "retry"
    assert waits == [0.5, 2.0]
    waits.clear()
    outcomes = iter(["retry", "gone", "delivered"])
    assert retry.CALLBACK.call(lambda: next(outcomes)) == "gone" and waits == [0.5]


def test_database_retries_transient_errors_only(waits: list[float]) -> None:
    lost = sa.exc.OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    call = failing([lost] * 7, "written")
    assert retry.DATABASE.call(call) == "written" and waits == list(retry.DATABASE.delays)
    waits.clear()
    with pytest.raises(sa.exc.IntegrityError):
        retry.DATABASE.call(failing([sa.exc.IntegrityError("INSERT", {}, Exception("duplicate"))]))
    assert waits == []


def test_terminal_publish_retries_redis_and_socket_errors(waits: list[float]) -> None:
    call = failing([redis.ConnectionError("down"), ConnectionResetError(), redis.TimeoutError(), OSError()], 7)
    assert retry.TERMINAL_PUBLISH.call(call) == 7 and waits == [0.1, 0.3, 1.0, 2.0]
    waits.clear()
    with pytest.raises(redis.ConnectionError):
        retry.TERMINAL_PUBLISH.call(failing([redis.ConnectionError("down")] * 5))
    assert waits == [0.1, 0.3, 1.0, 2.0]
    waits.clear()
    with pytest.raises(ModelError):
        retry.TERMINAL_PUBLISH.call(failing([ModelError("not ours to retry")]))
    assert waits == []


def test_a_loop_can_iterate_the_policy_between_tries(waits: list[float]) -> None:
    seen: list[int] = []
    for attempt in retry.FETCH.retrying():
        with attempt:
            seen.append(attempt.retry_state.attempt_number)
            if len(seen) < 2:
                raise transient_image()
    assert seen == [1, 2] and waits == [0.2]


# -- the model's backoff ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5, 10])
@pytest.mark.parametrize("retry_after", [0.5, 3.0, 7.25, 100.0])
def test_backoff_is_never_shorter_than_retry_after(attempt: int, retry_after: float) -> None:
    for _ in range(50):
        assert retry.MODEL.delay(attempt, retry_after) >= retry_after


def test_backoff_is_exponential_capped_and_jittered() -> None:
    for attempt in range(1, 12):
        ceiling = min(60.0, 1.0 * 2 ** (attempt - 1))
        draws = [retry.MODEL.delay(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in draws), (attempt, min(draws), max(draws))
        assert len(set(draws)) > 20  # jittered: workers that failed together do not retry together
    assert max(retry.MODEL.delay(30) for _ in range(200)) <= 60.0
    assert retry.MODEL.with_limits(0.05, 2.0).delay(1, 0.0) <= 0.05


# -- retry policies --------------------------------------------------------------------------------
def test_a_policy_retries_its_errors_then_gives_up_with_the_last_one() -> None:
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


def test_callback_deliveries_wait_longer_each_try_with_up_to_a_fifth_less() -> None:
    backoff = retry.CALLBACK_DELIVERY.with_limits(10, 100)
    for attempt, ceiling in ((1, 10), (2, 20), (3, 40), (5, 100), (9, 100)):
        draws = [backoff.delay(attempt) for _ in range(50)]
        assert all(0.8 * ceiling <= d <= ceiling for d in draws)


def test_a_lost_subscription_reconnects_sooner_first_and_never_waits_more_than_two_seconds() -> None:
    assert [retry.SUBSCRIBE_RECONNECT.delay(n) for n in (1, 2, 3, 5, 9)] == [0.1, 0.2, 0.4, 1.6, 2.0]
