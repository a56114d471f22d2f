"""Cancellation and the per-task time limit: one thread per worker process watches the cancel channel
and the deadlines of running streams, and closes what a run is waiting on (its model stream, or a wait
for quota or a retry, all on the worker's loop) so the model stops generating (and billing) at once,
even when the stream is stalled. (Asking for a cancel is
contracts/cancel.py; this is how a worker hears it.)"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from celery.worker.state import revoked

from contracts import keys, retry
from contracts.errors import StreamStopped
from contracts.logging import get_logger
from worker.loop import TaskCloser, uncancel_current

log = get_logger(__name__)


class RunWatch:
    """What the watcher knows of one running task."""

    def __init__(self, task_id: str, deadline: float) -> None:
        self.task_id = task_id
        self.deadline = deadline
        self.cancelled = False
        self.timed_out = False
        self.superseded = False  # another delivery took the task's lease over (see worker/lease.py)
        self._stream: Any = None
        self._lock = threading.Lock()

    def should_stop(self) -> bool:
        if not self.timed_out and time.monotonic() >= self.deadline:
            self.timed_out = True
        return self.cancelled or self.timed_out or self.superseded

    def remaining_s(self) -> float:
        """Seconds left before the task's time limit."""
        return self.deadline - time.monotonic()

    def supersede(self) -> None:
        self.superseded = True
        self.close_stream()

    def attach(self, stream: Any) -> None:
        with self._lock:
            self._stream = stream
        if self.should_stop():
            self.close_stream()

    def detach(self, stream: Any) -> None:
        """Forget `stream` (its wait or its call is over), unless another was attached since."""
        with self._lock:
            if self._stream is stream:
                self._stream = None

    def close_stream(self) -> None:
        with self._lock:
            stream, self._stream = self._stream, None
        if stream is not None:
            try:
                stream.close()
            except Exception:  # closing a broken connection may raise; the stream is gone either way
                log.debug("stream.close_failed", task_id=self.task_id)


class CancelWatcher:
    def __init__(self, client: redis.Redis, poll_s: float = 0.2) -> None:
        self.redis = client
        self.poll_s = poll_s
        self._runs: dict[str, RunWatch] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qvq-cancel-watcher", daemon=True)

    def start(self) -> CancelWatcher:
        self._thread.start()
        return self

    def register(self, task_id: str, timeout_s: float) -> RunWatch:
        watch = RunWatch(task_id, time.monotonic() + timeout_s)
        with self._lock:
            self._runs[task_id] = watch
        watch.cancelled = self.is_cancel_requested(task_id)
        return watch

    def unregister(self, task_id: str) -> None:
        with self._lock:
            self._runs.pop(task_id, None)

    def is_cancel_requested(self, task_id: str) -> bool:
        """The cancel flag; False when Redis cannot tell (the channel, once back, still delivers)."""
        try:
            return bool(self.redis.exists(keys.cancel_key(task_id)))
        except redis.RedisError as exc:
            log.warning("cancel_watcher.flag_unreadable", task_id=task_id, error=str(exc))
            return False

    def stop(self) -> None:
        self._stopped.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            try:
                self._listen()
            except Exception as exc:  # Redis gone (it reconnects), or the client closed under it at shutdown
                if self._stopped.is_set():
                    return
                log.warning("cancel_watcher.redis_error", error=str(exc), kind=type(exc).__name__)
                self._stopped.wait(retry.LOOP_ERROR_PAUSE_S)

    def _listen(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]  # typed from redis-py 8
        try:
            pubsub.subscribe(keys.CANCEL_CHANNEL)
            self._recheck_flags()  # a cancel published while we were not listening
            while not self._stopped.is_set():
                message = pubsub.get_message(timeout=self.poll_s)
                if message is not None:
                    self._cancel(message["data"].decode())
                self._cancel_revoked()
                self._enforce_deadlines()
        finally:
            pubsub.close()

    def _cancel(self, task_id: str) -> None:
        with self._lock:
            watch = self._runs.get(task_id)
        if watch is not None:
            watch.cancelled = True
            watch.close_stream()

    def _cancel_revoked(self) -> None:
        """`celery control revoke ID` of a running task (without --terminate, which a threads pool
        cannot do) cancels it like `qvq cancel`: Celery only records the id in its revoked set."""
        with self._lock:
            ids = [task_id for task_id, watch in self._runs.items() if not watch.cancelled and task_id in revoked]
        for task_id in ids:
            log.info("task.revoked_while_running", task_id=task_id)
            self._cancel(task_id)

    def _recheck_flags(self) -> None:
        with self._lock:
            ids = list(self._runs)
        for task_id in ids:
            if self.is_cancel_requested(task_id):
                self._cancel(task_id)

    def _enforce_deadlines(self) -> None:
        with self._lock:
            watches = list(self._runs.values())
        for watch in watches:
            if watch.should_stop():
                watch.close_stream()


def sleep_unless_stopped(seconds: float, should_stop: Callable[[], bool], tick_s: float = 0.1) -> None:
    """Wait `seconds` in this thread, looking at `should_stop` every tick; StreamStopped as soon as it
    says so. For threads that have no run to watch (tests, tools); a run waits with `wait_unless_stopped`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if should_stop():
            raise StreamStopped()
        time.sleep(min(tick_s, max(0.0, deadline - time.monotonic())))


async def wait_unless_stopped(seconds: float, watch: RunWatch) -> None:
    """Wait `seconds` on the loop; StreamStopped at once when the run is cancelled, times out or is
    superseded (the watcher closes the wait as it would close a stream). No polling: one timer."""
    if watch.should_stop():
        raise StreamStopped()
    closer = TaskCloser.current()
    watch.attach(closer)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        closer.disarm()
        if not closer.fired:
            raise
        uncancel_current()
        raise StreamStopped() from None
    finally:
        closer.disarm()
        watch.detach(closer)
    if watch.should_stop():
        raise StreamStopped()
