"""The service's rate limit, emulated: requests and tokens per minute, and per second (limit/60,
rounded up) as a burst guard. A request over either answers 429 with the seconds until it would fit.

Sliding windows of exactly 1 s and 60 s; a request's input tokens count when it is accepted, its output
tokens when its stream ends; refused requests count for nothing. A single request larger than a token
limit is accepted when its window is empty (else it could never be). Off when rpm and tpm are 0.
"""

from __future__ import annotations

import bisect
import math
import time
from collections.abc import Callable

from emulator.stats import Stats

WINDOWS_S = (1.0, 60.0)


class RateLimit:
    def __init__(self, rpm: int, tpm: int, stats: Stats, clock: Callable[[], float] = time.monotonic) -> None:
        self.rpm, self.tpm = rpm, tpm
        self.stats = stats
        self.clock = clock
        self.requests: list[float] = []  # accepted requests' arrival times, in order
        self.tokens: list[tuple[float, int]] = []

    @property
    def enabled(self) -> bool:
        return self.rpm > 0 or self.tpm > 0

    def admit(self, input_tokens: int, arrived: float | None = None) -> float | None:
        """Record the request and return None, or return the Retry-After (seconds) of its 429.

        `arrived`: when the request reached the server (its images are decoded before its tokens are
        known; that time must not shift it in the window)."""
        if not self.enabled:
            return None
        now = self.clock() if arrived is None else arrived
        self._expire(self.clock())
        wait = max(self._request_wait(now), self._token_wait(now, input_tokens))
        if wait > 0:
            self.stats.rate_limited += 1
            return max(1.0, math.ceil(wait))  # whole seconds, like the service's header
        bisect.insort(self.requests, now)
        bisect.insort(self.tokens, (now, input_tokens))
        self._note_peaks(now)
        return None

    def charge_output(self, output_tokens: int) -> None:
        if self.enabled and output_tokens > 0:
            now = self.clock()
            bisect.insort(self.tokens, (now, output_tokens))

    def _expire(self, now: float) -> None:
        horizon = now - WINDOWS_S[1]
        del self.requests[:bisect.bisect_right(self.requests, horizon)]
        del self.tokens[:bisect.bisect_right(self.tokens, (horizon, float("inf")))]

    def _request_wait(self, now: float) -> float:
        if self.rpm <= 0:
            return 0.0
        wait = 0.0
        for window, limit in zip(WINDOWS_S, (math.ceil(self.rpm / 60), self.rpm), strict=True):
            inside = [t for t in self.requests if now - window < t <= now]
            if len(inside) >= limit:
                wait = max(wait, inside[len(inside) - limit] + window - now)
        return wait

    def _token_wait(self, now: float, need: int) -> float:
        if self.tpm <= 0:
            return 0.0
        wait = 0.0
        for window, limit in zip(WINDOWS_S, (math.ceil(self.tpm / 60), self.tpm), strict=True):
            inside = [(t, n) for t, n in self.tokens if now - window < t <= now]
            used = sum(n for _, n in inside)
            if used == 0 or used + need <= limit:
                continue
            for t, n in inside:
                used -= n
                if used == 0 or used + need <= limit:
                    wait = max(wait, t + window - now)
                    break
        return wait

    def _note_peaks(self, now: float) -> None:
        """What the limit is checked against: the windows as each request is accepted, itself included."""
        stats = self.stats
        for t in (now, *(t for t in self.requests if now < t <= now + 1.0)):  # windows ending at or after it
            stats.max_requests_1s = max(stats.max_requests_1s, sum(1 for r in self.requests if t - 1.0 < r <= t))
            stats.max_tokens_1s = max(stats.max_tokens_1s, sum(n for r, n in self.tokens if t - 1.0 < r <= t))
        stats.max_requests_60s = max(stats.max_requests_60s, sum(1 for r in self.requests if now - 60.0 < r))
        stats.max_tokens_60s = max(stats.max_tokens_60s, sum(n for r, n in self.tokens if now - 60.0 < r))
