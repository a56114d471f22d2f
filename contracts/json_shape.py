"""The shape of JSON a caller sent: how deeply it nests, read without recursion (a hostile body may nest
100,000 levels deep, which would exhaust Python's stack in `json.loads` or in any recursive walk)."""

from __future__ import annotations

import json
from typing import Any

from contracts.errors import JsonTooDeep

#: The deepest nesting any JSON body may have (a job request nests 8 levels of metadata at most; a
#: notification in an SNS or MNS envelope about 8).
MAX_JSON_DEPTH = 32


def nesting_depth(value: Any, stop_above: int) -> int:
    """How deeply `value` nests (a scalar is 0, `[]` is 1); stops counting past `stop_above`."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            if depth > stop_above:
                return depth
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def loads_bounded(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads`, refusing (JsonTooDeep) a value nested deeper than `max_depth`; JSONDecodeError as usual."""
    try:
        value = json.loads(text)
    except RecursionError:
        raise JsonTooDeep(f"nested deeper than {max_depth} levels") from None
    if nesting_depth(value, max_depth) > max_depth:
        raise JsonTooDeep(f"nested deeper than {max_depth} levels")
    return value
