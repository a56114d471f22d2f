"""The emulated rate limit: per minute and per second, requests and tokens, 429 with Retry-After."""

from __future__ import annotations

import httpx
import pytest

from emulator.config import EmulatorConfig
from emulator.ratelimit import RateLimit
from emulator.server import EmulatorServer
from emulator.stats import Stats


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_requests_per_second_and_per_minute() -> None:
    clock, stats = Clock(), Stats()
    rate = RateLimit(rpm=90, tpm=0, stats=stats, clock=clock)  # 2 per second, 90 per minute
    assert rate.admit(10) is None and rate.admit(10) is None
    assert rate.admit(10) == 1.0 and stats.rate_limited == 1
    for _ in range(44):
        clock.now += 1.0
        assert rate.admit(10) is None and rate.admit(10) is None
    clock.now += 1.0
    assert rate.admit(10) == 15.0  # 90 in the last minute: the minute binds, not the second
    assert stats.max_requests_1s == 2 and stats.max_requests_60s == 90


def test_tokens_per_second_with_a_lone_oversized_call_allowed() -> None:
    clock, stats = Clock(), Stats()
    rate = RateLimit(rpm=0, tpm=6000, stats=stats, clock=clock)  # 100 tokens per second
    assert rate.admit(500) is None  # alone in an empty window
    assert rate.admit(1) is not None
    clock.now += 1.01
    assert rate.admit(60) is None
    rate.charge_output(30)
    assert rate.admit(20) is not None  # 60 + 30 + 20 > 100
    assert stats.max_tokens_1s == 500


def test_an_arrival_is_placed_by_when_it_arrived_not_when_it_was_decoded() -> None:
    clock, stats = Clock(), Stats()
    rate = RateLimit(rpm=60, tpm=0, stats=stats, clock=clock)
    assert rate.admit(1, arrived=clock.now) is None
    clock.now += 1.2
    assert rate.admit(1, arrived=clock.now - 0.3) is not None  # arrived 0.9 s after the first


def test_the_server_answers_429_with_retry_after_beyond_the_limit() -> None:
    with EmulatorServer(EmulatorConfig(rpm=60)) as server:
        body = {"model": "qvq-max", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        first = httpx.post(f"{server.url}/chat/completions", json=body, timeout=10)
        second = httpx.post(f"{server.url}/chat/completions", json=body, timeout=10)
    assert first.status_code == 200
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "limit_requests"
    assert server.stats["rate_limited"] == 1


def test_negative_limits_are_refused() -> None:
    with pytest.raises(ValueError, match="rpm and tpm"):
        EmulatorConfig(rpm=-1)
