"""Points in time as callers write them (an API query parameter, a CLI option), read once."""

from __future__ import annotations

import datetime as dt
import re

_DATE_FIRST = re.compile(r"^\d{4}-\d{2}-\d{2}")


def parse_iso(value: str) -> dt.datetime:
    """An ISO 8601 / RFC 3339 date or date-time (`Z` or an offset; none means UTC), zone-aware; ValueError
    otherwise (a bare number is refused, never taken as a timestamp)."""
    if not _DATE_FIRST.match(value):
        raise ValueError(f"not a date-time: {value!r}")
    moment = dt.datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
