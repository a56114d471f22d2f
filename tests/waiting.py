"""The one way a test waits: on a condition, polled, with a deadline (never a bare sleep)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def wait_until(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition not met", *,
               poll_s: float = 0.02, detail: Callable[[], str] | None = None) -> T:
    """Poll `condition` until it returns something truthy, and return that; past `timeout` seconds,
    AssertionError saying `what` (and `detail()`, e.g. a worker's log)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} (within {timeout:g} s)" + (f"\n{detail()}" if detail else ""))
        time.sleep(poll_s)


def seconds_until(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition not met",
                  **options: Any) -> float:
    """How long `condition` took to hold (AssertionError past the timeout, as wait_until)."""
    started = time.monotonic()
    wait_until(condition, timeout, what, **options)
    return time.monotonic() - started
