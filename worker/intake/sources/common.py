"""What every image source shares."""

from __future__ import annotations

from typing import Protocol

from contracts.errors import ImageError
from contracts.object_store import scheme_of


class Source(Protocol):
    schemes: tuple[str, ...]

    def fetch(self, ref: str) -> bytes: ...

    def close(self) -> None: ...


def check_size(n: int, max_bytes: int, ref: str) -> None:
    """Refuse what was read past the cap (sources read at most max_bytes + 1)."""
    if n > max_bytes:
        raise ImageError(f"more than {max_bytes:,} bytes", code="image.too_large", ref=ref)

__all__ = ["Source", "check_size", "scheme_of"]
