"""Per-task leases in Redis: which worker is running a task right now.

The Redis broker delivers a message again when it is not acknowledged within the visibility timeout,
even when the worker that has it is alive and still streaming. A delivery first takes the task's
lease (`SET NX` with a TTL, renewed by one thread per process every TTL/3 while the task runs):

- taken: run the task (a new attempt);
- held by another, live worker: wait, without running anything, until the task is terminal (then
  acknowledge and drop this delivery) or the lease expires (its worker died: take over, resume).

Waiting instead of dropping at once matters with kombu's Redis transport: restoring a message for
redelivery removes it from the unacked set, so the waiting delivery is the one copy that brings the
task back if the running worker dies later.

A lease that cannot be renewed because another delivery took it over (this process was cut off from
Redis or frozen longer than the TTL) is reported through `Lease.on_lost`; the pipeline then stops its
stream without writing anything. Redis being unreachable is not a reason to stop: renewals resume,
recreating the key if Redis lost it, and the store's terminal claim keeps the result exactly-once.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import redis

from contracts.keys import lease_key
from contracts.logging import get_logger

log = get_logger(__name__)

# KEYS: lease. ARGV: token, ttl ms. Renew ours, or recreate it when Redis lost it (a restart).
_RENEW_LUA = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] or not holder then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Lease:
    """One held lease. `guarded` is False when Redis was unreachable at acquire time (the task runs
    anyway; the renewer creates the key once Redis answers)."""

    def __init__(self, task_id: str, token: str, guarded: bool = True) -> None:
        self.task_id = task_id
        self.token = token
        self.guarded = guarded
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    def mark_lost(self) -> None:
        if self.lost:
            return
        self.lost = True
        if self.on_lost is not None:
            self.on_lost()


class LeaseKeeper:
    """Takes, renews and releases the leases of the tasks this process runs."""

    def __init__(self, client: redis.Redis, *, ttl_s: float, owner: str) -> None:
        self.redis = client
        self.ttl_ms = max(100, int(ttl_s * 1000))
        self.owner = owner
        self.renew_every_s = max(0.05, ttl_s / 3)
        self._renew = client.register_script(_RENEW_LUA)
        self._release = client.register_script(_RELEASE_LUA)
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._redis_down = False
        self.handing_back = False  # the worker is shutting down and gives its tasks back
        self._thread = threading.Thread(target=self._run, name="qvq-lease-keeper", daemon=True)

    def start(self) -> LeaseKeeper:
        """Start renewing the held leases every TTL/3."""
        self._thread.start()
        return self

    def try_acquire(self, task_id: str) -> Lease | None:
        """The lease, or None while another worker holds it."""
        token = f"{self.owner}:{uuid.uuid4().hex[:12]}"
        try:
            taken = self.redis.set(lease_key(task_id), token, nx=True, px=self.ttl_ms)
        except redis.RedisError as exc:
            log.warning("lease.unavailable", task_id=task_id, error=str(exc))
            taken, guarded = True, False
        else:
            guarded = True
        if not taken:
            return None
        lease = Lease(task_id, token, guarded)
        with self._lock:
            self._held[task_id + "\0" + token] = lease
        return lease

    def holder(self, task_id: str) -> str | None:
        try:
            value: Any = self.redis.get(lease_key(task_id))
        except redis.RedisError:
            return None
        return value.decode() if isinstance(value, bytes) else value

    def release(self, lease: Lease) -> None:
        with self._lock:
            self._held.pop(lease.task_id + "\0" + lease.token, None)
        if lease.lost:
            return
        try:
            self._release(keys=[lease_key(lease.task_id)], args=[lease.token])
        except redis.RedisError as exc:  # it expires on its own
            log.warning("lease.release_failed", task_id=lease.task_id, error=str(exc))

    def stop(self) -> None:
        self._stopped.set()

    def hand_back_all(self) -> int:
        """Shutting down: stop every task this process runs (as if its lease was lost: the stream is
        closed, nothing is written) and free their leases, so another worker resumes them at once."""
        self.handing_back = True
        with self._lock:
            leases = list(self._held.values())
        for lease in leases:
            lease.mark_lost()
            try:
                self._release(keys=[lease_key(lease.task_id)], args=[lease.token])
            except redis.RedisError as exc:  # it expires on its own within the TTL
                log.warning("lease.release_failed", task_id=lease.task_id, error=str(exc))
        if leases:
            log.warning("lease.handed_back", leases=len(leases))
        return len(leases)

    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def renew_all(self) -> None:
        with self._lock:
            leases = list(self._held.values())
        if not leases:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for lease in leases:
                self._renew(keys=[lease_key(lease.task_id)], args=[lease.token, self.ttl_ms], client=pipe)
            results = pipe.execute()
        except redis.RedisError as exc:
            if not self._redis_down:
                log.warning("lease.renew_failed", error=str(exc), leases=len(leases))
            self._redis_down = True
            return
        if self._redis_down:
            log.info("lease.renewing_again", leases=len(leases))
            self._redis_down = False
        for lease, kept in zip(leases, results, strict=True):
            if not kept:
                log.warning("lease.lost", task_id=lease.task_id, holder=self.holder(lease.task_id))
                lease.mark_lost()

    def _run(self) -> None:
        while not self._stopped.wait(self.renew_every_s):
            started = time.monotonic()
            try:
                self.renew_all()
            except Exception:  # the renewer must outlive any surprise
                log.exception("lease.renewer_crashed")
            if time.monotonic() - started > self.renew_every_s:
                log.warning("lease.renew_slow", took_s=round(time.monotonic() - started, 3))
