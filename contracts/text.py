"""Text that may enter the system: no NUL and no lone surrogates, anywhere a string arrives.

PostgreSQL refuses NUL in text columns and UTF-8 cannot encode a lone surrogate (JSON's `"\\ud800"`), so
such a string would be accepted at intake and fail only when the answer is stored or the record is read
back. Every string of a request is checked here once, at intake, and refused naming its field.
"""

from __future__ import annotations

from typing import Any

from contracts.errors import RequestError


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "must not contain NUL (U+0000)"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode (a lone surrogate cannot be encoded as UTF-8)"
    return None


def check_text(value: str, field: str) -> str:
    """`value`, or RequestError naming `field` when it holds NUL or a lone surrogate."""
    problem = text_problem(value)
    if problem:
        raise RequestError(problem, field=field)
    return value


def check_json_text(value: Any, field: str) -> None:
    """Every key and string inside a JSON value (iteratively: a hostile value may be nested deeply)."""
    pending: list[tuple[Any, str]] = [(value, field)]
    while pending:
        item, where = pending.pop()
        if isinstance(item, str):
            check_text(item, where)
        elif isinstance(item, dict):
            for key, child in item.items():
                check_text(str(key), where)
                pending.append((child, f"{where}.{key}"))  # the key passed check_text just above
        elif isinstance(item, list):
            pending.extend((child, f"{where}[{index}]") for index, child in enumerate(item))
