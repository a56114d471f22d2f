"""Retry policies and every delay between tries, one per kind of call, declared once here and nowhere else.

Fixed schedules (tenacity; `policy.call(fn, ...)` runs fn under the policy and returns its last result or
raises its last error):

    policy             tries  waits between tries (s)           retried on
    FETCH              3      0.2, 0.6                          a retryable QvqError (an image over HTTP)
    CALLBACK           3      0.5, 2                            a "retry" outcome (the POST to callback_url)
    DATABASE           8      0.2, 0.5, 1, 2, 4, 8, 15 (30.7)   a transient database error (terminal write)
    TERMINAL_PUBLISH   5      0.1, 0.3, 1, 2                    a Redis or socket error (terminal event)
    IMPORTANT_PUBLISH  3      0.05, 0.2                         the same, for task.retrying (voids text on screens)
    SSE_RECONNECT      6      0.1, 0.3, 1, 2, 3                 an HTTP event stream that dropped without progress
    ENQUEUE            3      0.2, 0.7 (kombu's retry_policy)   the broker refusing a task message

Exponential schedules (`backoff.delay(n)`: base * 2^(n-1), capped, with jitter; declared in
contracts/backoff.py, which the settings read their defaults from without loading this module's
clients), for loops that must do something between tries and read their waits from here:

    backoff              base, cap (s)   jitter                 used by
    MODEL                1, 60           upper half; >= Retry-After   model calls (task.retrying between tries;
                                                                QVQ_RETRY_BASE_S, QVQ_RETRY_MAX_S)
    CALLBACK_DELIVERY    5, 3600         0.8-1.0 of the wait    a durable callback delivery (QVQ_CALLBACK_BACKOFF_S,
                                                                QVQ_CALLBACK_BACKOFF_MAX_S), for QVQ_CALLBACK_MAX_AGE_S
    SUBSCRIBE_RECONNECT  0.1, 2          none                   a Redis subscription that lost its connection
    REDIS_FAILOVER       0.05, 1         full (redis-py's)      a Redis command behind Sentinel while the master
                                                                changes (REDIS_FAILOVER_TRIES tries, up to ~17 s)

and single pauses: REQUEUE_PAUSE_S (a task put back while the database is away), EVENTS_COOLDOWN_S
(non-terminal events skipped after a failed publish), LOOP_ERROR_PAUSE_S (a background loop's error).
Waits go through `sleep` below, which tests replace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import sqlalchemy as sa
import tenacity

from contracts.backoff import CALLBACK_DELIVERY, MODEL, SUBSCRIBE_RECONNECT, Backoff
from contracts.errors import QvqError
from contracts.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

#: the outcome a call returns (rather than raises) when it asks to be tried again (worker/callback.py)
RETRY_OUTCOME = "retry"
#: Database errors worth retrying (connection lost, server gone, SQLite busy, a timeout); others are bugs.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
#: Redis errors of a publish (the server is gone, restarting, or the socket timed out).
TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def sleep(seconds: float) -> None:
    time.sleep(seconds)


@dataclass(frozen=True)
class Policy:
    name: str
    delays: tuple[float, ...]  # waits between tries: len(delays) + 1 tries in all
    retry: tenacity.retry_base  # which failures (or results) are worth another try

    @property
    def attempts(self) -> int:
        return len(self.delays) + 1

    def retrying(self, **overrides: Any) -> tenacity.Retrying:
        """A fresh tenacity controller for one call under this policy."""
        options: dict[str, Any] = {
            "stop": tenacity.stop_after_attempt(self.attempts),
            "wait": tenacity.wait_chain(*(tenacity.wait_fixed(delay) for delay in self.delays)),
            "retry": self.retry,
            "sleep": lambda seconds: sleep(seconds),  # looked up at each wait, so tests can patch it
            "before_sleep": self._log_retry,
            "retry_error_callback": _last_outcome,
        }
        return tenacity.Retrying(**{**options, **overrides})

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result: T = self.retrying()(fn, *args, **kwargs)
        return result

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None and outcome.failed else None
        log.info("retry.waiting", policy=self.name, attempt=state.attempt_number, of=self.attempts,
                 wait_s=state.next_action.sleep if state.next_action else None,
                 error=str(error) if error is not None else None)


def _last_outcome(state: tenacity.RetryCallState) -> Any:
    """Out of tries: the last result, or the last error raised again (never tenacity's RetryError)."""
    assert state.outcome is not None
    return state.outcome.result()


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, QvqError) and exc.retryable


FETCH = Policy("fetch", (0.2, 0.6), tenacity.retry_if_exception(_retryable))
CALLBACK = Policy("callback", (0.5, 2.0), tenacity.retry_if_result(lambda outcome: outcome == RETRY_OUTCOME))
DATABASE = Policy("database", (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0),
                  tenacity.retry_if_exception_type(TRANSIENT_DB_ERRORS))
TERMINAL_PUBLISH = Policy("terminal_publish", (0.1, 0.3, 1.0, 2.0),
                          tenacity.retry_if_exception_type(TRANSIENT_REDIS_ERRORS))
IMPORTANT_PUBLISH = Policy("important_publish", (0.05, 0.2),
                           tenacity.retry_if_exception_type(TRANSIENT_REDIS_ERRORS))
SSE_RECONNECT = Policy("sse_reconnect", (0.1, 0.3, 1.0, 2.0, 3.0), tenacity.retry_if_exception_type(OSError))
#: kombu's own form (Celery's send_task retry_policy): waits 0.2, then 0.2 + 0.5, at most 1 s each.
ENQUEUE = {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5, "interval_max": 1.0}
#: botocore's standard retry mode, attempts in all (an object store read).
OBJECT_STORE_ATTEMPTS = 3

REQUEUE_PAUSE_S = 2.0
EVENTS_COOLDOWN_S = 2.0
LOOP_ERROR_PAUSE_S = 1.0

__all__ = ["CALLBACK", "CALLBACK_DELIVERY", "DATABASE", "ENQUEUE", "EVENTS_COOLDOWN_S", "FETCH", "IMPORTANT_PUBLISH",
           "LOOP_ERROR_PAUSE_S", "MODEL", "OBJECT_STORE_ATTEMPTS", "REQUEUE_PAUSE_S", "SSE_RECONNECT",
           "SUBSCRIBE_RECONNECT", "TERMINAL_PUBLISH", "TRANSIENT_DB_ERRORS", "TRANSIENT_REDIS_ERRORS", "Backoff",
           "Policy", "sleep"]
