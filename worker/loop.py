"""The worker process's event loop: one asyncio loop, on its own thread, owns every wait of the process.

A model stream, its delta coalescing and the group-committed event publishing, a wait for model quota
or tenant rate, a retry's backoff, and every callback POST run here as coroutines. Celery stays the
engine (delivery, acks, revoke, the lease and the sweep): a task thread does the short steps of its run
(the row, the lease, the images, the terminal write) and hands the waiting to this loop with `run`,
waiting on a future that costs no CPU while the loop serves every other stream.

Why a thread and not asyncio everywhere: Celery's threads pool calls tasks synchronously, and its
acknowledgement (acks_late) must follow the run's end. Admission is therefore still bounded by Celery's
concurrency (QVQ_WORKER_CONCURRENCY, default 200): a parked task thread uses no CPU (100 live streams
grew the worker's RSS by 29 MB in all, bench/RESULTS.md), so the default is high and the loop, not the
thread count, sets the cost of a stream.

The loop starts when first used (or with `start()` at worker_ready) and `stop()` cancels what still
runs on it and joins its thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, ParamSpec, TypeVar

from contracts import retry
from contracts.logging import get_logger

log = get_logger(__name__)
T = TypeVar("T")
P = ParamSpec("P")
STOP_TIMEOUT_S = 5.0
#: How long a thread may hold the GIL while another waits for it (Python's default: 5 ms). The loop thread
#: shares the GIL with the task threads' CPU steps (start, end of run); at 1 ms it gets it back sooner.
#: Measured (bench/RESULTS.md, 200 streams x 50 tokens/s, 50 ms coalescing, paired runs): delta delay p99
#: 112 ms on average at 5 ms (6 runs, 89-130) and 80 ms at 1 ms (9 runs, 42-109), same worker CPU; 0.3 ms
#: was no better than 1 ms.
GIL_SWITCH_INTERVAL_S = 0.001


class WorkerLoop:
    """An asyncio loop on a daemon thread; `run` (from another thread) waits for a coroutine's result."""

    def __init__(self, name: str = "qvq-loop") -> None:
        self._name = name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._background: set[concurrent.futures.Future[Any]] = set()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop (started on first use)."""
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                self._start_locked()
            assert self._loop is not None
            return self._loop

    def start(self) -> WorkerLoop:
        _ = self.loop
        return self

    def in_loop(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the loop and wait for its result (its exception is raised here)."""
        if self.in_loop():
            coro.close()
            raise RuntimeError("WorkerLoop.run called from the loop's own thread (await the coroutine instead)")
        future = self.submit(coro)
        with cpu_gate.waiting():
            return future.result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the loop, in a copy of the caller's context (its log fields, such as the
        task_id, and its trace span go with it); a future of its result. Cancelling the future cancels it."""
        loop, context = self.loop, contextvars.copy_context()
        result: concurrent.futures.Future[T] = concurrent.futures.Future()

        def start() -> None:
            if result.cancelled():
                coro.close()
                return
            task = loop.create_task(coro, context=context)
            task.add_done_callback(lambda done: _settle(result, done))
            result.add_done_callback(lambda future: loop.call_soon_threadsafe(task.cancel) if future.cancelled()
                                     else None)

        loop.call_soon_threadsafe(start)
        return result

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Run a coroutine on the loop without waiting; an exception it raises is logged."""
        future = self.submit(coro)
        self._background.add(future)
        future.add_done_callback(self._spawned_done)
        return future

    def _spawned_done(self, future: concurrent.futures.Future[Any]) -> None:
        self._background.discard(future)
        if not future.cancelled() and future.exception() is not None:
            error = future.exception()
            log.error("loop.task_failed", error=f"{type(error).__name__}: {error}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Cancel what still runs on the loop, stop it and join its thread."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None:
            cpu_gate.forget(loop)
        if loop is None or thread is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # already stopping
            asyncio.run_coroutine_threadsafe(_cancel_all(), loop).result(timeout_s)
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)

    def _start_locked(self) -> None:
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)  # process-wide: this loop is the process's one
        loop = new_event_loop()
        ready = threading.Event()
        thread = threading.Thread(target=self._serve, args=(loop, ready), name=self._name, daemon=True)
        self._loop, self._thread = loop, thread
        thread.start()
        ready.wait()
        cpu_gate.defer_to(loop)

    @staticmethod
    def _serve(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(ready.set)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop (libuv) where it is installed (Linux, macOS): the loop's own bookkeeping per chunk
    (select, handles, socket transports) is what it does faster than asyncio's pure-Python loop
    (bench/RESULTS.md); asyncio's loop elsewhere."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def _settle(result: concurrent.futures.Future[T], task: asyncio.Task[T]) -> None:
    """The task's outcome onto the caller's future (as asyncio.run_coroutine_threadsafe does)."""
    if task.cancelled():
        result.cancel()
    if not result.set_running_or_notify_cancel():  # cancelled (by the caller, or just now)
        return
    error = task.exception()
    if error is not None:
        result.set_exception(error)
    else:
        result.set_result(task.result())


async def _cancel_all() -> None:
    me = asyncio.current_task()
    tasks = [task for task in asyncio.all_tasks() if task is not me]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=STOP_TIMEOUT_S)


def uncancel_current() -> None:
    """Forget a cancel this task asked for itself (a stream closed on purpose), so later awaits and
    asyncio.timeout blocks of the same task behave."""
    task = asyncio.current_task()
    if task is not None:
        while task.cancelling():
            task.uncancel()


class TaskCloser:
    """Stops a coroutine from any thread while it is armed: what a RunWatch closes on cancel, time limit or
    hand-back. The model call arms it for the life of its HTTP stream only, so a close that arrives later
    (the text is being published, the run is ending) interrupts nothing."""

    def __init__(self, task: asyncio.Task[Any], loop: asyncio.AbstractEventLoop) -> None:
        self._task = task
        self._loop = loop
        self.armed = True
        self.fired = False

    @classmethod
    def current(cls) -> TaskCloser:
        task = asyncio.current_task()
        assert task is not None, "TaskCloser.current() outside a task"
        return cls(task, asyncio.get_running_loop())

    def close(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing left to stop
            self._loop.call_soon_threadsafe(self._fire)

    def disarm(self) -> None:
        """Called on the loop once the stream is over."""
        self.armed = False

    def _fire(self) -> None:
        if self.armed and not self.fired:
            self.fired = True
            self._task.cancel()


class CpuGate:
    """Task threads' CPU-heavy steps: one at a time, each after the loop has caught up; re-entrant per thread.

    The loop shares the process's GIL with every task thread, and Python gives the GIL no priorities. A
    task thread's start and end of run (the row, the attempt, the ledger, the terminal write) are
    milliseconds of Python; with 200 runs starting or ending within a second or two, those threads took
    the GIL from the loop and the text of every stream still running waited. So a step holds the one
    slot, and first waits until the loop has run what was ready when it asked (`_after_loop`): the loop
    goes first and a step gets what it leaves. A wait inside a step (a database round trip, a retry's
    sleep, a wait for the loop) frees the slot meanwhile (`waiting`), so a slow database does not queue
    the other steps. At most `admitted` steps are under way at once (one running, the others waiting
    inside or to go on), fewer than the store's connection pool holds: a step that holds the slot and
    waits for a connection never waits for one held by a step that waits for the slot (without this
    bound, 200 short tasks on PostgreSQL deadlocked until the pool's timeout).
    Every entry waits for the loop, the return from a wait inside a step too: between any two bursts of
    task-thread Python the loop catches up. Measured at 200 streams x 50 tokens/s (bench/RESULTS.md, 50 ms
    / no coalescing): added delay p99 11-14 / 12-19 ms so, against 20-47 / 26-32 ms when only a step's
    start waited for the loop and 13-15 / 17-32 ms with two slots. A parked thread waits without CPU."""

    def __init__(self, slots: int, admitted: int = 8) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._admitted = threading.BoundedSemaphore(max(slots, admitted))
        self._local = threading.local()
        self._loop: asyncio.AbstractEventLoop | None = None

    def defer_to(self, loop: asyncio.AbstractEventLoop) -> None:
        """The loop steps wait for: the process's one (the latest started)."""
        self._loop = loop

    def forget(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._loop is loop:
            self._loop = None

    def gated(self, function: Callable[P, T]) -> Callable[P, T]:
        """`function` run through the gate."""
        @functools.wraps(function)
        def gated(*args: P.args, **kwargs: P.kwargs) -> T:
            with self.step():
                return function(*args, **kwargs)

        return gated

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        if self._on_the_loop():  # the loop goes first: it never waits here
            yield
            return
        depth = getattr(self._local, "depth", 0)
        if depth == 0:
            self._admitted.acquire()
            try:
                self._enter()
            except BaseException:
                self._leave()
                self._admitted.release()
                raise
        self._local.depth = depth + 1
        try:
            yield
        finally:
            self._local.depth = depth
            if depth == 0:
                self._leave()
                self._admitted.release()

    @contextlib.contextmanager
    def waiting(self) -> Iterator[None]:
        """A wait inside a step: the slot is someone else's until it is over (a no-op outside a step)."""
        if not getattr(self._local, "held", False):
            yield
            return
        self._leave()
        try:
            yield
        finally:
            self._enter()

    def sleep(self, seconds: float) -> None:
        """A retry's wait inside a step (tenacity's `sleep`): the slot is free meanwhile."""
        with self.waiting():
            retry.sleep(seconds)

    def _enter(self) -> None:
        self._slots.acquire()
        self._local.held = True
        self._after_loop()

    def _leave(self) -> None:
        if getattr(self._local, "held", False):
            self._local.held = False
            self._slots.release()

    def _after_loop(self) -> None:
        """Wait until the loop has run every callback that was ready now (bounded: a stuck loop does not
        stop the steps)."""
        loop = self._loop
        if loop is None:
            return
        caught_up = threading.Event()
        try:
            loop.call_soon_threadsafe(caught_up.set)
        except RuntimeError:  # the loop is closed
            return
        caught_up.wait(LOOP_CATCH_UP_TIMEOUT_S)

    def _on_the_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:  # a thread with no running loop: a task thread
            return False


CPU_STEP_SLOTS = 1
#: Steps under way at once; below the store's pool (contracts/store/engine.py: 20 + 50 on PostgreSQL).
ADMITTED_STEPS = 8
LOOP_CATCH_UP_TIMEOUT_S = 0.5  # the longest a step waits for the loop (a stuck loop does not stop the steps)
cpu_gate = CpuGate(CPU_STEP_SLOTS, ADMITTED_STEPS)
