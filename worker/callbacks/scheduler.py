"""The due-time scheduler of callback deliveries: one thread per worker process sends the deliveries whose
time has come (deliveries.py explains the due set), and every SWEEP_S re-adds pending rows overdue by
SWEEP_GRACE_S, so a delivery survives a Redis restart, a lost message or a killed worker."""

from __future__ import annotations

import datetime as dt
import threading
import time

from contracts import keys
from contracts.logging import get_logger
from worker.callbacks.deliveries import enqueue
from worker.context import WorkerContext

log = get_logger(__name__)
SWEEP_S = 15.0
SWEEP_GRACE_S = 30.0  # a row overdue by this much lost its wake-up (Redis restarted, a message was lost)
BATCH = 200


class DueScheduler:
    def __init__(self, ctx: WorkerContext) -> None:
        self.ctx = ctx
        self.poll_s = max(0.05, min(1.0, ctx.settings.callback_backoff_s / 4))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="qvq-callbacks-due", daemon=True)
        self._next_sweep = 0.0

    def start(self) -> DueScheduler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.tick()
            except Exception as exc:  # Redis or the database away: the next tick tries again
                log.warning("callback.scheduler_failed", error=f"{type(exc).__name__}: {exc}")

    def tick(self) -> int:
        """Send what is due now; every SWEEP_S also re-add due rows from the database. Returns the count sent."""
        now = time.time()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_S
            overdue = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=SWEEP_GRACE_S)
            for event_id, at in self.ctx.store.due_callbacks(at=overdue):
                self.ctx.redis.zadd(keys.CALLBACKS_DUE, {event_id: at.timestamp()}, nx=True)
        sent = 0
        members: list[bytes] = self.ctx.redis.zrangebyscore(  # type: ignore[assignment]
            keys.CALLBACKS_DUE, "-inf", now, start=0, num=BATCH)
        for member in members:
            if self.ctx.redis.zrem(keys.CALLBACKS_DUE, member):  # the one process that removed it sends it
                enqueue(self.ctx, member.decode())
                sent += 1
        return sent
