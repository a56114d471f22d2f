"""Counters a test or benchmark reads at GET /_emulator/stats."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class Stats:
    requests: int = 0  # chat-completion requests received, refused ones included
    errors: int = 0  # answered with an HTTP error (faults included)
    streams_started: int = 0
    streams_active: int = 0
    streams_completed: int = 0  # sent through [DONE]
    streams_cut: int = 0  # dropped on purpose (fault cut, or the emulator stopping)
    disconnects: int = 0  # the client went away before the end
    tokens_streamed: int = 0  # reasoning + answer chunks handed to the server
    rate_limited: int = 0  # answered 429 by the emulated rate limit (emulator/ratelimit.py)
    max_requests_1s: int = 0  # the most accepted requests seen in any 1 s window (rate limit on)
    max_requests_60s: int = 0
    max_tokens_1s: int = 0  # the most tokens in a window when a request was accepted (itself included)
    max_tokens_60s: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def reset(self) -> None:
        active = self.streams_active
        self.__init__()  # type: ignore[misc]
        self.streams_active = active
