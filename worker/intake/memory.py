"""Memory for decoding images: one budget of decoded pixels per worker process, and handing freed heap
back to the operating system after a large decode."""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from contracts.errors import ImageError

DECODE_MEMORY_BUDGET = 1 << 30  # bytes of decoded pixels held at once by one process (QVQ_DECODE_MEMORY_MB)


class MemoryBudget:
    """Admission by decoded pixels across every task of this process: a decode reserves its estimate
    first and WAITS while the budget is spent (the job is slower, it does not fail). One image whose
    estimate alone is over the whole budget is refused (`image.too_many_pixels`): it could never run."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit = limit_bytes
        self.used = 0
        self.peak = 0  # the most reserved at once (for the tests and the logs)
        self._cond = threading.Condition()

    def resize(self, limit_bytes: int) -> None:
        with self._cond:
            self.limit = limit_bytes
            self._cond.notify_all()

    @contextmanager
    def reserve(self, n: int, ref: str | None = None) -> Iterator[None]:
        n = max(0, n)
        with self._cond:
            if n > self.limit:
                raise ImageError(
                    f"decoding it needs about {n >> 20} MB, over this worker's decode budget of "
                    f"{self.limit >> 20} MB (QVQ_DECODE_MEMORY_MB); send a smaller image",
                    code="image.too_many_pixels", ref=ref)
            self._cond.wait_for(lambda: self.used + n <= self.limit)
            self.used += n
            self.peak = max(self.peak, self.used)
        try:
            yield
        finally:
            with self._cond:
                self.used -= n
                self._cond.notify_all()


#: 16 threads each decoding a 50 MP WEBP would need about 10 GB; this keeps a worker near 1 GiB.
decode_budget = MemoryBudget(DECODE_MEMORY_BUDGET)


def _load_libc_trim() -> Callable[[int], int] | None:
    try:
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim
        return trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to trim
        return None


_malloc_trim = _load_libc_trim()
#: After a decode this large, hand the freed heap back to the OS: glibc keeps freed memory in its
#: per-thread arenas (gc.collect() frees Python objects, not malloc's pages), so RSS would stay at
#: the peak of the largest decode for the life of the process.
TRIM_AFTER_BYTES = 32 << 20


def release_memory() -> None:
    if _malloc_trim is not None:
        _malloc_trim(0)


