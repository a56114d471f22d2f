"""Retry policies, one per kind of call, declared once here (tenacity) and nowhere else.

    policy            tries  waits between tries (s)           retried on
    FETCH             3      0.2, 0.6                          a retryable QvqError (an image over HTTP)
    CALLBACK          3      0.5, 2                            a "retry" outcome (the POST to callback_url)
    DATABASE          8      0.2, 0.5, 1, 2, 4, 8, 15 (30.7)   a transient database error (terminal write)
    TERMINAL_PUBLISH  5      0.1, 0.3, 1, 2                    a Redis or socket error (terminal event)

`policy.call(fn, ...)` runs fn under the policy and returns its last result or raises its last error.
A loop that must do something between tries (publish `task.retrying`, log its own event) iterates
`policy.retrying()` or reads `policy.delays`. Waits go through `sleep` below, which tests replace.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import sqlalchemy as sa
import tenacity

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
