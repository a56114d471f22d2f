"""In-memory stand-ins for the worker's outside systems, for unit tests that drive a run step by step
(tests/worker/test_pipeline.py). Each is small and keeps the contract of the real one it replaces; the
store is the real Store on an in-memory SQLite database, so rows and the ledger behave exactly as in
production. Integration tests use the real things (tests/reliability/)."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from contracts.bus import EventBus
from contracts.errors import ModelError, StreamStopped
from contracts.settings import Settings
from contracts.store import Store
from tests.imagegen import make_image
from worker.context import WorkerContext
from worker.recovery.cancel import RunWatch
from worker.recovery.lease import Lease
from worker.stream.model import StreamResult


def memory_store() -> Store:
    """The real Store on a private in-memory SQLite database (one connection, shared by threads)."""
    engine = sa.create_engine("sqlite://", poolclass=StaticPool, connect_args={"check_same_thread": False})
    store = Store(engine)
    store.create_schema()
    return store


class MemoryBus:
    """The event bus in memory: seq per task (never below the floor), a log per task, thread-safe.
    `fail(type_)` returning True makes that publish raise as if Redis were gone."""

    def __init__(self, fail: Callable[[str], bool] | None = None) -> None:
        self.logs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.fail = fail or (lambda _type: False)
        self._seqs: dict[str, int] = defaultdict(int)
        self._lock = threading.Lock()
        self.lost: set[str] = set()  # as EventBus: a task's next event after a lost one skips a seq

    def note_lost(self, task_id: str) -> None:
        self.lost.add(task_id)

    def publish(self, task_id: str, type_: str, attempt: int, *, seq_floor: int = 0, **fields: Any) -> int:
        if self.fail(type_):
            self.lost.add(task_id)
            raise ConnectionError("Redis is gone (test)")
        with self._lock:
            skip = 1 if task_id in self.lost else 0
            self.lost.discard(task_id)
            seq = self._seqs[task_id] = max(self._seqs[task_id], seq_floor) + 1 + skip
            event = {"seq": seq, "task_id": task_id, "type": type_, "ts": time.time(), "attempt": attempt, **fields}
            self.logs[task_id].append(json.loads(json.dumps(event)))  # as it would come back from Redis
        return seq

    publish_soon = EventBus.publish_soon  # publishes at once, as the sync bus does on a loop

    def read_log(self, task_id: str, after_seq: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [event for event in self.logs[task_id] if event["seq"] > after_seq]

    def types(self, task_id: str) -> list[str]:
        return [event["type"] for event in self.read_log(task_id)]

    def text(self, task_id: str, type_: str, attempt: int | None = None) -> str:
        return "".join(e["text"] for e in self.read_log(task_id)
                       if e["type"] == type_ and (attempt is None or e["attempt"] == attempt))


Step = Iterable[tuple[str, str]] | BaseException | Callable[[], None]


class ScriptedModel:
    """The model call, scripted: each call plays the next step, a list of ("reasoning" | "answer", text)
    pieces (then the stream ends properly, with usage), or an exception raised before any text. A
    callable in a list is called between pieces (a cancel arriving mid-stream)."""

    def __init__(self, *steps: Any) -> None:
        self.steps = list(steps)
        self.calls: list[dict[str, Any]] = []

    async def stream(self, *, model: str, messages: list[dict[str, Any]], high_resolution: bool, attempt: int,
                     on_text: Callable[[str, str], None], should_stop: Callable[[], bool] = lambda: False,
                     on_open: Callable[[Any], None] | None = None,
                     prompt_tokens_estimate: int | None = None, trace: Any = None) -> StreamResult:
        self.calls.append({"model": model, "messages": messages, "attempt": attempt})
        step = self.steps.pop(0)
        if isinstance(step, BaseException):
            raise step
        if on_open:
            on_open(self)
        result = StreamResult()
        for piece in step:
            if callable(piece):
                piece()
                await asyncio.sleep(0)  # a cancel arriving mid-stream reaches the loop
            else:
                kind, text = piece
                result.add(kind, text)
                on_text(kind, text)
            if should_stop():
                raise StreamStopped(result.finish())
        result.finish_reason = "stop"
        result.usage = {"prompt_tokens": prompt_tokens_estimate or 0,
                        "completion_tokens": len(result.finish().reasoning + result.answer),
                        "total_tokens": (prompt_tokens_estimate or 0) + len(result.reasoning + result.answer)}
        return result

    def close(self) -> None:  # what a watch does to a stream it stops
        pass


def broken(message: str = "cut", code: str = "model.stream_broken") -> ModelError:
    return ModelError(message, code=code)


class StaticFetcher:
    """Every reference is the same small PNG."""

    def __init__(self, size: tuple[int, int] = (56, 56)) -> None:
        self.data = make_image("PNG", size)
        self.fetched: list[str] = []

    def fetch(self, ref: str) -> bytes:
        self.fetched.append(ref)
        return self.data

    def presigned_url(self, ref: str, expires_s: int) -> str | None:
        return None

    def close(self) -> None:
        pass


class StubLeases:
    """Every lease is granted at once (one delivery per task in these tests)."""

    handing_back = False

    def __init__(self) -> None:
        self._tokens = itertools.count(1)

    def try_acquire(self, task_id: str) -> Lease:
        return Lease(task_id, f"test:{next(self._tokens)}")

    def release(self, lease: Lease) -> None:
        pass

    def holder(self, task_id: str) -> str | None:
        return None


class StubCancels:
    """The cancel watcher without Redis: `cancel(task_id)` is what a `qvq cancel` would make the worker hear."""

    def __init__(self) -> None:
        self.watches: dict[str, RunWatch] = {}

    def register(self, task_id: str, timeout_s: float) -> RunWatch:
        watch = self.watches[task_id] = RunWatch(task_id, time.monotonic() + timeout_s)
        return watch

    def unregister(self, task_id: str) -> None:
        pass

    def cancel(self, task_id: str) -> None:
        watch = self.watches[task_id]
        watch.cancelled = True
        watch.close_stream()


def worker_context(store: Store, model: ScriptedModel, *, bus: MemoryBus | None = None,
                   settings: Settings | None = None, **parts: Any) -> WorkerContext:
    """A WorkerContext of doubles (no Redis, no model service, no flow control)."""
    values: dict[str, Any] = {
        "settings": settings or Settings(retry_base_s=0.001, retry_max_s=0.01), "redis": None,
        "bus": bus or MemoryBus(), "store": store, "fetcher": StaticFetcher(), "model": model,
        "image_pool": None, "cancels": StubCancels(), "name": "test:1", "leases": StubLeases(),
        "sender": None, "flow": None, **parts}
    return WorkerContext(**values)

