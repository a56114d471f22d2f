"""Fair sharing between tenants, across the fleet: running-task slots and requests per minute, in Redis.

- Slots (`concurrency`): a zset of holders scored by lease expiry; a worker renews the slots it holds
  every TTL/3 (QVQ_LEASE_TTL_S, like task leases), so a dead worker's slots come back when they expire.
- Rate (`rpm`): a sliding minute of the tenant's model calls; a call that would exceed it waits.

Both only ever make a task wait (task.waiting, reason tenant_concurrency / tenant_rate), never fail.
"""

from __future__ import annotations

import math
import threading
import time
import uuid

import redis

from contracts import flow, keys
from contracts.flow import TenantLimit
from contracts.logging import get_logger

log = get_logger(__name__)

# KEYS: slots. ARGV: holder, limit, ttl ms. Returns {taken (0/1), holders}.
_TAKE_SLOT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or held < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return {1, redis.call('ZCARD', KEYS[1])}
end
return {0, held}
"""

# KEYS: slots. ARGV: ttl ms, holder... Renews the holders still present (XX: never resurrects one).
_RENEW_SLOTS_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for i = 2, #ARGV do redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""

# KEYS: requests. ARGV: id, rpm, window ms. Returns wait ms (0: taken).
_TAKE_RATE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window, limit = tonumber(ARGV[3]), tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
local inside = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local n = #inside / 2
if n >= limit then return tonumber(inside[(n - limit) * 2 + 2]) + window - now end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], window)
return 0
"""


class TenantGate:
    """One per worker process: takes, renews and gives back tenant slots; takes tenant rate."""

    def __init__(self, client: redis.Redis, limits: dict[str, TenantLimit], *, lease_ttl_s: float) -> None:
        self.client = client
        self.limits = limits
        self.ttl_ms = max(1000, math.ceil(lease_ttl_s * 1000))
        self._take_slot = client.register_script(_TAKE_SLOT_LUA)
        self._renew = client.register_script(_RENEW_SLOTS_LUA)
        self._take_rate = client.register_script(_TAKE_RATE_LUA)
        self._held: dict[str, str] = {}  # holder -> tenant
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def limit(self, tenant: str | None) -> TenantLimit:
        return flow.tenant_limit(self.limits, tenant)

    # -- concurrency ---------------------------------------------------------------------------
    def try_slot(self, tenant: str | None, task_id: str) -> str | None:
        """A slot for this delivery of the task (its holder id), or None when the tenant is at its limit.
        A tenant without a concurrency limit always gets one (holder ""; nothing to give back)."""
        limit = self.limit(tenant).concurrency
        if limit is None:
            return ""
        holder = f"{task_id}:{uuid.uuid4().hex[:8]}"
        taken, _ = self._take_slot(keys=[keys.tenant_slots_key(tenant)], args=[holder, limit, self.ttl_ms])
        if not int(taken):
            return None
        with self._lock:
            self._held[holder] = tenant or "-"
        self._ensure_renewer()
        return holder

    def release(self, tenant: str | None, holder: str) -> None:
        if not holder:
            return
        with self._lock:
            self._held.pop(holder, None)
        try:
            self.client.zrem(keys.tenant_slots_key(tenant), holder)
        except redis.RedisError as exc:  # it expires with its lease
            log.warning("flow.slot_release_failed", error=str(exc))

    def running(self, tenant: str | None) -> int:
        key = keys.tenant_slots_key(tenant)
        seconds, micros = self.client.time()
        return int(self.client.zcount(key, int(seconds) * 1000 + int(micros) // 1000, "+inf"))

    def _ensure_renewer(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._renew_loop, name="qvq-tenant-slots", daemon=True)
                self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_ms / 3000):
            with self._lock:
                by_tenant: dict[str, list[str]] = {}
                for holder, tenant in self._held.items():
                    by_tenant.setdefault(tenant, []).append(holder)
            for tenant, holders in by_tenant.items():
                try:
                    self._renew(keys=[keys.tenant_slots_key(None if tenant == "-" else tenant)],
                                args=[self.ttl_ms, *holders])
                except Exception as exc:  # the renewer must outlive any surprise, or live slots expire
                    log.warning("flow.slot_renew_failed", error=f"{type(exc).__name__}: {exc}")

    def stop(self) -> None:
        self._stop.set()

    # -- rate ----------------------------------------------------------------------------------
    def try_rate(self, tenant: str | None) -> float:
        """Take one of the tenant's requests per minute: 0 when taken, else the seconds to wait."""
        rpm = self.limit(tenant).rpm
        if rpm is None:
            return 0.0
        wait_ms = self._take_rate(keys=[keys.tenant_requests_key(tenant)],
                                  args=[f"{time.time_ns()}-{uuid.uuid4().hex[:8]}", rpm, 60_000])
        return int(wait_ms) / 1000
