"""The worker's retry policies, declared once (tenacity), one per kind of call.

- DATABASE: a store write through a short outage, about half a minute in all, then the error.
- TERMINAL_PUBLISH: the terminal event of a task whose result is already persisted.

The model call's retries stay an explicit loop in the pipeline (it publishes task.retrying between
tries); its delays come from `backoff_s` and the settings.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
import sqlalchemy as sa
import tenacity

from contracts.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")

#: Database errors worth retrying (connection lost, server gone, SQLite busy, a timeout); others are bugs.
TRANSIENT_DB_ERRORS: tuple[type[BaseException], ...] = (
    sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
#: Redis errors of a publish (the server is gone, restarting, or the socket timed out).
TRANSIENT_REDIS_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


@dataclass(frozen=True)
class RetryPolicy:
    """Try, then wait `waits_s[i]` after the i-th failure; after the last wait's try, re-raise."""

    name: str
    waits_s: tuple[float, ...]
    on: tuple[type[BaseException], ...]

    @property
    def total_wait_s(self) -> float:
        return sum(self.waits_s)

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(len(self.waits_s) + 1),
            wait=tenacity.wait_chain(*(tenacity.wait_fixed(w) for w in self.waits_s)),
            retry=tenacity.retry_if_exception_type(self.on),
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(fn, *args, **kwargs)

    def _log_retry(self, state: tenacity.RetryCallState) -> None:
        error = state.outcome.exception() if state.outcome else None
        delay = state.next_action.sleep if state.next_action else None
        log.warning("retry.waiting", policy=self.name, tries=state.attempt_number, retry_in_s=delay,
                    error=f"{type(error).__name__}: {error}")


DATABASE = RetryPolicy("database", (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0), TRANSIENT_DB_ERRORS)
TERMINAL_PUBLISH = RetryPolicy("terminal_publish", (0.1, 0.3, 1.0, 2.0), TRANSIENT_REDIS_ERRORS)
