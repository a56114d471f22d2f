"""Exponential waits between tries, declared once (contracts/retry.py lists every retry policy and delay,
these included; the settings take their defaults from here, without loading the clients retry.py needs)."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Backoff:
    """Exponential waits: `base_s * 2^(n-1)` capped at `max_s`, then a uniform draw in
    [(1 - jitter) * wait, wait] (jitter 0.5 is "equal jitter": tries that failed together do not retry
    together). `delay(n, retry_after_s)` never waits less than the server's Retry-After, even above the cap."""

    name: str
    base_s: float
    max_s: float
    jitter: float = 0.0

    def with_limits(self, base_s: float, max_s: float) -> Backoff:
        """The same schedule with the base and cap a setting gives."""
        return replace(self, base_s=base_s, max_s=max_s)

    def delay(self, attempt: int, retry_after_s: float | None = None) -> float:
        """The wait after the `attempt`-th failed try (1, 2, ...)."""
        ceiling = min(self.max_s, self.base_s * (2 ** (max(1, attempt) - 1)))
        wait = float(ceiling)
        if self.jitter:
            wait = min(wait, round(random.uniform(wait * (1 - self.jitter), wait), 3))
        if retry_after_s is not None and wait < retry_after_s:
            wait = math.ceil(retry_after_s * 1000) / 1000
        return wait


MODEL = Backoff("model", base_s=1.0, max_s=60.0, jitter=0.5)
CALLBACK_DELIVERY = Backoff("callback_delivery", base_s=5.0, max_s=3_600.0, jitter=0.2)
SUBSCRIBE_RECONNECT = Backoff("subscribe_reconnect", base_s=0.1, max_s=2.0)
#: A Redis command behind Sentinel while the master changes (contracts/redis_clients.py): redis-py's
#: jittered exponential waits with this base and cap, REDIS_FAILOVER_TRIES times (waits of at most 17.5 s in all, about 9 s on average).
REDIS_FAILOVER = Backoff("redis_failover", base_s=0.05, max_s=1.0)
REDIS_FAILOVER_TRIES = 20
