"""Injected faults and the attempt they apply to.

A plan is written `kind[:arg][@when]`, comma separated, e.g. `429@1,cut:5@2,500@3`:
- `429`, `500`, `503`, `400`, `inspect`: answer that HTTP error instead of streaming
- `cut:K`: stream K chunks (the role chunk counts), then drop the connection (never after [DONE])
- `stall`: stream the first chunk, then send nothing until the client goes away
`when` is an attempt number `N`, `N+` (N and later) or `*` (every attempt, also when omitted).
The first matching fault wins. The attempt is the `X-Qvq-Attempt` header when present, else how many
times this emulator has seen the same messages.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from emulator import errors

ATTEMPT_HEADER = "x-qvq-attempt"

HTTP_FAULTS: dict[str, Callable[[float], errors.ApiError]] = {
    "429": errors.rate_limited,
    "500": lambda _: errors.internal_error(),
    "503": lambda _: errors.model_unavailable(),
    "400": lambda _: errors.invalid_parameter("Emulated invalid parameter (fault injection)."),
    "inspect": lambda _: errors.data_inspection_failed(),
}
STREAM_FAULTS = ("cut", "stall")

_ITEM = re.compile(r"^(?P<kind>[a-z0-9]+)(?::(?P<arg>\d+))?(?:@(?P<when>\*|\d+\+?))?$")


@dataclass(frozen=True)
class Fault:
    kind: str
    arg: int | None = None
    first_attempt: int = 1
    last_attempt: int | None = None  # None: no upper bound

    def applies_to(self, attempt: int) -> bool:
        return self.first_attempt <= attempt and (self.last_attempt is None or attempt <= self.last_attempt)

    def http_error(self, retry_after_s: float) -> errors.ApiError | None:
        make = HTTP_FAULTS.get(self.kind)
        return make(retry_after_s) if make else None


def parse_plan(text: str) -> tuple[Fault, ...]:
    return tuple(_parse_item(item.strip().lower()) for item in text.split(",") if item.strip())


def _parse_item(item: str) -> Fault:
    match = _ITEM.match(item)
    kind = match["kind"] if match else ""
    if not match or kind not in (*HTTP_FAULTS, *STREAM_FAULTS):
        raise ValueError(f"bad fault {item!r}: expected one of 429 500 503 400 inspect cut:K stall, @N")
    if (kind == "cut") != (match["arg"] is not None):
        raise ValueError(f"bad fault {item!r}: cut needs a chunk count (cut:K), other kinds take none")
    arg = int(match["arg"]) if match["arg"] is not None else None
    when = match["when"] or "*"
    if when == "*":
        return Fault(kind, arg)
    first = int(when.rstrip("+"))
    if first < 1:
        raise ValueError(f"bad fault {item!r}: attempts count from 1")
    return Fault(kind, arg, first, None if when.endswith("+") else first)


def fault_for(plan: tuple[Fault, ...], attempt: int) -> Fault | None:
    return next((fault for fault in plan if fault.applies_to(attempt)), None)


class AttemptCounter:
    """How many times each distinct messages list was seen (attempt 1 is the first time).

    Bounded (least recently seen forgotten first) so a long benchmark does not grow it without end.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._max_entries = max_entries

    def next_attempt(self, messages: Any) -> int:
        canonical = json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        key = hashlib.sha256(canonical.encode()).hexdigest()
        attempt = self._seen.pop(key, 0) + 1
        self._seen[key] = attempt
        if len(self._seen) > self._max_entries:
            self._seen.popitem(last=False)
        return attempt

    def clear(self) -> None:
        self._seen.clear()


def attempt_from_header(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        attempt = int(value)
    except ValueError:
        raise errors.invalid_parameter(f"X-Qvq-Attempt must be a positive integer, not {value!r}") from None
    if attempt < 1:
        raise errors.invalid_parameter(f"X-Qvq-Attempt must be a positive integer, not {value!r}")
    return attempt
