"""Tenant budgets by reservation: before a model call, reserve its worst-case cost against the tenant's
daily and monthly budgets in one atomic step; when the call ends, settle to what it actually cost.

Money is exact: Decimal CNY, kept in Redis as integer micro-yuan (the ledger's 6 places).
Per tenant and period (UTC day, UTC month) one Redis hash holds `spent` (settled calls) and `reserved`
(calls in flight, each also in a zset with an expiry, so a dead worker's reservation lapses). The
database (qvq_usage) is the truth for money spent: `spent` is loaded from it when the period's hash
is missing (first use, or Redis lost it), and every settled call is written to the ledger first.

    reserve: purge lapsed reservations; spent + reserved + worst case <= budget ? reserve : budget.exceeded
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass
from decimal import Decimal

import redis

from contracts import keys
from contracts.catalog import MONEY_PLACES
from contracts.errors import BudgetError
from contracts.flow import TenantLimit, tenant_limit
from contracts.logging import get_logger
from contracts.store import Store

log = get_logger(__name__)
MICRO = Decimal(1) / MONEY_PLACES  # 10**6

# KEYS: per period (hash, reservations zset, amounts hash), for day then month.
# ARGV: reservation id, amount, ttl ms, key ttl ms, then per period: budget (-1: none), spent from the
# database (-1: not read). Returns {1} reserved, {0, period, spent, reserved} refused, {-1, period} load.
_RESERVE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local id, amount, ttl, keep = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
for p = 0, 1 do
  local budget, loaded = tonumber(ARGV[5 + p * 2]), tonumber(ARGV[6 + p * 2])
  if budget >= 0 then
    local h, res, amt = KEYS[p * 3 + 1], KEYS[p * 3 + 2], KEYS[p * 3 + 3]
    for _, lapsed in ipairs(redis.call('ZRANGEBYSCORE', res, '-inf', now)) do
      redis.call('HINCRBY', h, 'reserved', -tonumber(redis.call('HGET', amt, lapsed) or '0'))
      redis.call('HDEL', amt, lapsed)
      redis.call('ZREM', res, lapsed)
    end
    if redis.call('HEXISTS', h, 'spent') == 0 then
      if loaded < 0 then return {-1, p} end
      redis.call('HSET', h, 'spent', loaded)
      redis.call('PEXPIRE', h, keep)
    end
    local spent = tonumber(redis.call('HGET', h, 'spent'))
    local reserved = tonumber(redis.call('HGET', h, 'reserved') or '0')
    if spent + reserved + amount > budget then return {0, p, spent, reserved} end
  end
end
for p = 0, 1 do
  if tonumber(ARGV[5 + p * 2]) >= 0 then
    local h, res, amt = KEYS[p * 3 + 1], KEYS[p * 3 + 2], KEYS[p * 3 + 3]
    redis.call('HINCRBY', h, 'reserved', amount)
    redis.call('HSET', amt, id, amount)
    redis.call('ZADD', res, now + ttl, id)
    for _, k in ipairs({h, res, amt}) do redis.call('PEXPIRE', k, keep) end
  end
end
return {1}
"""

# KEYS: as above. ARGV: reservation id, actual cost. Moves the reservation into `spent` (only where the
# period's hash exists: a hash that Redis lost is reloaded from the ledger, which has the call).
_SETTLE_LUA = """
for p = 0, 1 do
  local h, res, amt = KEYS[p * 3 + 1], KEYS[p * 3 + 2], KEYS[p * 3 + 3]
  local reserved = redis.call('HGET', amt, ARGV[1])
  if reserved then
    redis.call('HINCRBY', h, 'reserved', -tonumber(reserved))
    redis.call('HDEL', amt, ARGV[1])
    redis.call('ZREM', res, ARGV[1])
    if redis.call('HEXISTS', h, 'spent') == 1 then redis.call('HINCRBY', h, 'spent', tonumber(ARGV[2])) end
  end
end
return 1
"""

PERIODS = ("daily", "monthly")


@dataclass(frozen=True)
class Reservation:
    id: str
    tenant: str | None
    amount: Decimal
    keys: tuple[str, ...]


def to_micro(amount: Decimal) -> int:
    return int((amount * MICRO).to_integral_value())


def from_micro(value: int) -> Decimal:
    return (Decimal(value) / MICRO).quantize(MONEY_PLACES)


def period_starts(at: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    day = at.astimezone(dt.UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day, day.replace(day=1)


class BudgetKeeper:
    """One per worker process."""

    def __init__(self, client: redis.Redis, store: Store, limits: dict[str, TenantLimit], *,
                 reservation_ttl_s: float) -> None:
        self.client = client
        self.store = store
        self.limits = limits
        self.ttl_ms = math.ceil(reservation_ttl_s * 1000)
        self._reserve = client.register_script(_RESERVE_LUA)
        self._settle = client.register_script(_SETTLE_LUA)

    def budgets(self, tenant: str | None) -> tuple[Decimal | None, Decimal | None]:
        limit = tenant_limit(self.limits, tenant)
        return limit.daily_budget_cny, limit.monthly_budget_cny

    def reserve(self, tenant: str | None, reservation_id: str, amount: Decimal) -> Reservation | None:
        """Reserve `amount`; None when the tenant has no budget; BudgetError when it cannot cover it."""
        budgets = self.budgets(tenant)
        if budgets == (None, None):
            return None
        now = dt.datetime.now(dt.UTC)
        starts = period_starts(now)
        keys = self._keys(tenant, now)
        loaded = [-1, -1]
        for _ in range(3):  # load each missing period from the ledger at most once
            args: list[str | int] = [reservation_id, to_micro(amount), self.ttl_ms, 40 * 86_400_000]
            for budget, spent in zip(budgets, loaded, strict=True):
                args += [-1 if budget is None else to_micro(budget), spent]
            answer = [int(v) for v in self._reserve(keys=list(keys), args=args)]
            if answer[0] == 1:
                return Reservation(reservation_id, tenant, amount, keys)
            if answer[0] == 0:
                raise self._refusal(tenant, amount, answer, budgets)
            period = answer[1]
            loaded[period] = to_micro(self.store.spent_since(tenant, starts[period]))
        raise BudgetError("the budget state keeps changing under this reservation; try again", retryable=True)

    def settle(self, reservation: Reservation, actual: Decimal) -> None:
        self._settle(keys=list(reservation.keys), args=[reservation.id, to_micro(actual)])

    def state(self, tenant: str | None) -> dict[str, dict[str, str | None]]:
        """Per period: budget, spent and reserved (CNY strings), as Redis holds them now."""
        out: dict[str, dict[str, str | None]] = {}
        keys = self._keys(tenant, dt.datetime.now(dt.UTC))
        for index, (name, budget) in enumerate(zip(PERIODS, self.budgets(tenant), strict=True)):
            values = self.client.hgetall(keys[index * 3])
            out[name] = {"budget": None if budget is None else str(budget),
                         "spent": str(from_micro(int(values.get(b"spent", 0)))),
                         "reserved": str(from_micro(int(values.get(b"reserved", 0))))}
        return out

    @staticmethod
    def _keys(tenant: str | None, now: dt.datetime) -> tuple[str, ...]:
        return keys.budget_keys(tenant, now.strftime("%Y-%m-%d"), now.strftime("%Y-%m"))

    def _refusal(self, tenant: str | None, amount: Decimal, answer: list[int],
                 budgets: tuple[Decimal | None, Decimal | None]) -> BudgetError:
        period, spent, reserved = answer[1], from_micro(answer[2]), from_micro(answer[3])
        log.warning("budget.refused", tenant=tenant, period=PERIODS[period], worst_case_cny=str(amount),
                    spent_cny=str(spent), reserved_cny=str(reserved), budget_cny=str(budgets[period]))
        return BudgetError(
            f"the {PERIODS[period]} budget of {budgets[period]} CNY cannot cover this task's worst case of "
            f"{amount} CNY ({spent} spent, {reserved} reserved by running tasks)")
