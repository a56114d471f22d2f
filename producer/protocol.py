"""What every client offers, whatever its transport: the direct ones (producer/client.py, producer/aio.py:
Redis and the database) and the HTTP ones (producer/http_client/: only QVQ_API_URL and a key).

    TaskClient        Client, HttpClient             (sync)
    AsyncTaskClient   AsyncClient, AsyncHttpClient   (asyncio)
    TaskHandle / AsyncTaskHandle                     one task of a client: its id and shortcuts

The `qvq` command talks to a TaskClient and never asks which one it has.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    from contracts.store import TaskRecord


class QueueView(Protocol):
    """What a queued task waits for, in words (producer/cli/waiting.py's QueueState)."""

    def describe(self) -> str: ...


class TaskClient(Protocol):
    #: True when local image paths are uploaded (HTTP), False when a worker reads them from this disk.
    uploads_local_files: bool

    def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
               **fields: Any) -> TaskHandle[Any]: ...
    def submit_request(self, request: dict[str, Any]) -> TaskHandle[Any]: ...
    def get(self, task_id: str) -> TaskRecord: ...
    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]: ...
    def result(self, task_id: str, timeout: float | None = None) -> TaskRecord: ...
    def cancel(self, task_id: str) -> bool: ...
    def retry(self, task_id: str) -> int: ...
    def tasks(self, *, status: str | None = None, since: dt.datetime | None = None, limit: int = 100,
              tenant: str | None = None) -> list[dict[str, Any]]: ...
    def usage(self, by: str = "model", *, since: dt.datetime | None = None, until: dt.datetime | None = None,
              tenant: str | None = None) -> dict[str, Any]: ...
    def limits(self) -> dict[str, Any]: ...
    def callback(self, task_id: str) -> dict[str, Any] | None: ...
    def redeliver_callback(self, task_id: str) -> dict[str, Any]: ...
    def conversation_exists(self, conversation_id: str) -> bool: ...
    def submit_batch(self, request: dict[str, Any]) -> dict[str, Any]: ...
    def batch(self, batch_id: str) -> dict[str, Any]: ...
    def cancel_batch(self, batch_id: str) -> dict[str, Any]: ...
    def retry_batch(self, batch_id: str) -> dict[str, Any]: ...
    def batch_events(self, batch_id: str, from_seq: int = 0) -> Iterator[dict[str, Any]]: ...
    def batch_results(self, batch_id: str, fmt: str = "jsonl") -> Iterator[str]: ...
    def queue_state(self) -> QueueView | None: ...
    def ping(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> Any: ...
    def __exit__(self, *exc: object) -> None: ...


class AsyncTaskClient(Protocol):
    async def submit(self, images: Sequence[str] = (), prompt: str = "", model: str | None = None,
                     **fields: Any) -> AsyncTaskHandle[Any]: ...
    async def submit_request(self, request: dict[str, Any]) -> AsyncTaskHandle[Any]: ...
    async def get(self, task_id: str) -> TaskRecord: ...
    def events(self, task_id: str, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> AsyncIterator[dict[str, Any]]: ...
    async def result(self, task_id: str, timeout: float | None = None) -> TaskRecord: ...
    async def cancel(self, task_id: str) -> bool: ...
    async def retry(self, task_id: str) -> int: ...
    async def aclose(self) -> None: ...


C = TypeVar("C", bound=TaskClient)
A = TypeVar("A", bound=AsyncTaskClient)


@dataclass(frozen=True)
class TaskHandle(Generic[C]):
    """One task of a sync client: its id and shortcuts."""

    task_id: str
    created: bool  # False when an idempotency key returned an earlier task
    client: C

    def events(self, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> Iterator[dict[str, Any]]:
        return self.client.events(self.task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout)

    def result(self, timeout: float | None = None) -> TaskRecord:
        return self.client.result(self.task_id, timeout=timeout)

    def status(self) -> str:
        return self.client.get(self.task_id).status

    def cancel(self) -> bool:
        return self.client.cancel(self.task_id)

    def retry(self) -> int:
        return self.client.retry(self.task_id)


@dataclass(frozen=True)
class AsyncTaskHandle(Generic[A]):
    """One task of an asyncio client: its id and shortcuts, awaited."""

    task_id: str
    created: bool
    client: A

    def events(self, from_seq: int = 0, timeout: float | None = None,
               idle_timeout: float | None = None) -> AsyncIterator[dict[str, Any]]:
        return self.client.events(self.task_id, from_seq=from_seq, timeout=timeout, idle_timeout=idle_timeout)

    async def result(self, timeout: float | None = None) -> TaskRecord:
        return await self.client.result(self.task_id, timeout=timeout)

    async def status(self) -> str:
        return (await self.client.get(self.task_id)).status

    async def cancel(self) -> bool:
        return await self.client.cancel(self.task_id)

    async def retry(self) -> int:
        return await self.client.retry(self.task_id)
