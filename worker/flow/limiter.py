"""The fleet-wide model limiter: requests and tokens per minute and per second, per model family, in Redis.

Every worker process asks the same Redis (Lua scripts, so each decision is atomic) before each model
call: `acquire` takes one request and the call's counted input tokens, or answers how long to wait;
`settle` charges the output tokens when the call ends (they may push later calls back); `tighten`
holds the whole family back for a 429's Retry-After, for every worker.

Windows are sliding logs (zsets of grants by time): at most `rpm` requests in any minute and
ceil(rpm/60) in any second, the same for tokens (a single call larger than the per-second or
per-minute token limit goes alone, when its window is empty, or it could never go).

Order: waiters queue in one zset per family, scored by a fair-queue round: a tenant's next waiter
goes one round after its previous one and never before the round being served, so tenants with
waiters take turns (one tenant's burst delays another tenant's single call by at most one call per
round), and a tenant's own waiters go first come, first served. Only the first `rps` waiters (the
heads) may take capacity; a waiter that stops asking (its worker died) drops out after TICKET_TTL_MS.
"""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from contracts import flow, keys
from contracts.catalog import model_info
from contracts.errors import StreamStopped
from contracts.flow import ModelLimit

TICKET_TTL_MS = 5_000
HEAD_POLL_S = 0.02  # a head that cannot go yet asks again when told, but at least this often when 0
QUEUE_POLL_S = (0.1, 0.5)  # near the head / far back in the queue

# KEYS: requests, tokens, waiters, alive, rounds, tightened.
# ARGV: ticket, tenant, input tokens, rpm, rps, tpm, tps, ticket ttl ms, second window ms, minute window ms,
# expected output tokens (charged at the grant, replaced by the actual output at settle: our count runs
# ahead of the service's, which charges output when the stream ends).
# Returns {granted (0/1), wait ms (-1: not a head yet), position in the queue}.
_ACQUIRE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ticket, tenant, need = ARGV[1], ARGV[2], tonumber(ARGV[3])
local rpm, rps, tpm, tps = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local ttl, sec, min = tonumber(ARGV[8]), tonumber(ARGV[9]), tonumber(ARGV[10])

local dead = redis.call('ZRANGEBYSCORE', KEYS[4], '-inf', now)
for _, d in ipairs(dead) do redis.call('ZREM', KEYS[3], d) end
if #dead > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now) end

local round = tonumber(redis.call('ZSCORE', KEYS[3], ticket))
if not round then
  local served = tonumber(redis.call('HGET', KEYS[5], ':served') or '0')
  local last = tonumber(redis.call('HGET', KEYS[5], tenant) or '0')
  round = math.max(served, last) + 1
  redis.call('HSET', KEYS[5], tenant, round)
  redis.call('ZADD', KEYS[3], round, ticket)
end
redis.call('ZADD', KEYS[4], now + ttl, ticket)
redis.call('PEXPIRE', KEYS[5], 86400000)

local pos = redis.call('ZRANK', KEYS[3], ticket)
if pos >= rps then return {0, -1, pos} end
local tight = redis.call('PTTL', KEYS[6])
if tight > 0 then return {0, tight, pos} end

redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - min)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - min)
local wait = 0
local function count_wait(window, limit)
  local inside = redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. (now - window), '+inf', 'WITHSCORES')
  local n = #inside / 2
  if n < limit then return 0 end
  return tonumber(inside[(n - limit) * 2 + 2]) + window - now
end
local function token_wait(window, limit)
  local inside = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. (now - window), '+inf', 'WITHSCORES')
  local used = 0
  for i = 1, #inside, 2 do used = used + tonumber(string.match(inside[i], ':(%d+)$')) end
  if used == 0 or used + need <= limit then return 0 end
  for i = 1, #inside, 2 do
    used = used - tonumber(string.match(inside[i], ':(%d+)$'))
    if used == 0 or used + need <= limit then return tonumber(inside[i + 1]) + window - now end
  end
  return window
end
-- the k-th head leaves room for the k heads before it, and never passes a head held back by tokens
local head = redis.call('ZRANGE', KEYS[3], 0, 0)[1]
if pos > 0 and redis.call('HGET', KEYS[5], ':blocked') == head then return {0, 50, pos} end
local wait_tokens = math.max(token_wait(sec, tps), token_wait(min, tpm))
if pos == 0 then
  if wait_tokens > 0 then redis.call('HSET', KEYS[5], ':blocked', ticket) else redis.call('HDEL', KEYS[5], ':blocked') end
end
wait = math.max(count_wait(sec, rps - pos), count_wait(min, rpm - pos), wait_tokens)
if wait > 0 then return {0, wait, pos} end

redis.call('ZADD', KEYS[1], now, ticket)
if need > 0 then redis.call('ZADD', KEYS[2], now, ticket .. ':in:' .. need) end
if tonumber(ARGV[11]) > 0 then redis.call('ZADD', KEYS[2], now, ticket .. ':exp:' .. ARGV[11]) end
redis.call('PEXPIRE', KEYS[1], min)
redis.call('PEXPIRE', KEYS[2], min)
redis.call('ZREM', KEYS[3], ticket)
redis.call('ZREM', KEYS[4], ticket)
local served = tonumber(redis.call('HGET', KEYS[5], ':served') or '0')
if round > served then redis.call('HSET', KEYS[5], ':served', round) end
return {1, 0, 0}
"""

# KEYS: tokens. ARGV: member, minute window ms, the expected-output member to replace (or "").
_SETTLE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if ARGV[3] ~= '' then redis.call('ZREM', KEYS[1], ARGV[3]) end
if tonumber(string.match(ARGV[1], ':(%d+)$')) > 0 then redis.call('ZADD', KEYS[1], now, ARGV[1]) end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return now
"""

# KEYS: tightened. ARGV: ms. Only ever lengthens the hold.
_TIGHTEN_LUA = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
  return 1
end
return 0
"""


@dataclass(frozen=True)
class Decision:
    """`go`, or wait about `wait_s` seconds (reason model_quota); `position` in the family's queue."""

    go: bool
    wait_s: float = 0.0
    position: int = 0
    reason: str = "model_quota"


class ModelLimiter:
    """One per worker process; every method is one atomic round trip to Redis."""

    def __init__(self, client: redis.Redis, limits: dict[str, ModelLimit],
                 windows_ms: tuple[int, int] = (flow.SECOND_WINDOW_MS, flow.MINUTE_WINDOW_MS)) -> None:
        self.client = client
        self.limits = limits
        self.windows_ms = windows_ms  # (second, minute); tests scale them down
        self._expected_output: dict[str, float] = {}  # family -> mean output tokens of its calls
        self._charged_expected: dict[str, int] = {}  # ticket -> expected output charged at its grant
        self._acquire = client.register_script(_ACQUIRE_LUA)
        self._settle = client.register_script(_SETTLE_LUA)
        self._tighten = client.register_script(_TIGHTEN_LUA)

    @staticmethod
    def new_ticket() -> str:
        """A waiter's id: its arrival time first, so equal rounds are served in arrival order."""
        return f"{time.time_ns() // 1000:017d}-{uuid.uuid4().hex[:12]}"

    def family(self, model: str) -> str:
        return model_info(model).family

    def limit(self, model: str) -> ModelLimit:
        family = self.family(model)
        return self.limits.get(family) or flow.DEFAULT_MODEL_LIMITS[family]

    def acquire(self, model: str, ticket: str, *, tenant: str | None, tokens: int) -> Decision:
        """One try: take 1 request + `tokens` now, or be told how long to wait (joining the queue)."""
        family, limit = self.family(model), self.limit(model)
        script_keys = [keys.requests_key(family), keys.tokens_key(family), keys.waiters_key(family),
                       keys.alive_key(family), keys.rounds_key(family), keys.tightened_key(family)]
        expected = int(self._expected_output.get(family, 0))
        args: list[str | int] = [ticket, tenant or "-", max(0, int(tokens)), limit.rpm, limit.rps, limit.tpm, limit.tps,
                TICKET_TTL_MS, *self.windows_ms, expected]
        granted, wait_ms, position = (int(v) for v in self._acquire(keys=script_keys, args=args))
        if granted:
            if expected:
                self._charged_expected[ticket] = expected
            return Decision(go=True)
        if wait_ms < 0:  # behind other waiters: about one call's spacing per waiter ahead
            spacing_s = max(60 / limit.rpm, 1 / limit.rps)
            return Decision(go=False, wait_s=round(spacing_s * (position - limit.rps + 1), 3), position=position)
        return Decision(go=False, wait_s=wait_ms / 1000, position=position)

    def settle(self, model: str, ticket: str, output_tokens: int) -> None:
        """Charge the call's output tokens to the current windows (0 when it produced none), in place of
        the output expected at the grant."""
        family = self.family(model)
        expected = self._charged_expected.pop(ticket, 0)
        if output_tokens > 0:  # a running mean of what calls of this family produce
            previous = self._expected_output.get(family)
            self._expected_output[family] = output_tokens if previous is None else 0.8 * previous + 0.2 * output_tokens
        member = f"{ticket}:out:{max(0, int(output_tokens))}"
        replaced = f"{ticket}:exp:{expected}" if expected else ""
        if output_tokens > 0 or replaced:
            self._settle(keys=[keys.tokens_key(family)], args=[member, self.windows_ms[1], replaced])

    def backlogged(self, model: str) -> bool:
        """Whether calls of this model's family are queued for quota now (a new one would wait)."""
        return bool(self.client.zcard(keys.waiters_key(self.family(model))))

    def leave(self, model: str, ticket: str) -> None:
        """Stop waiting (the task was cancelled while queued for quota)."""
        family = self.family(model)
        pipe = self.client.pipeline()
        pipe.zrem(keys.waiters_key(family), ticket)
        pipe.zrem(keys.alive_key(family), ticket)
        pipe.execute()

    def tighten(self, model: str, seconds: float) -> None:
        """A 429 arrived anyway: hold every worker's calls of this family back for `seconds`."""
        ms = max(1, math.ceil(seconds * 1000))
        self._tighten(keys=[keys.tightened_key(self.family(model))], args=[ms])

    def wait_for_capacity(
        self, model: str, *, tenant: str | None, tokens: int, should_stop: Callable[[], bool],
        on_wait: Callable[[Decision], None], sleep: Callable[[float], None] = time.sleep,
    ) -> str | None:
        """Block until this call may go; returns its ticket (for `settle`), or None when told to stop.

        `on_wait` hears the first wait and each estimate that changed by more than a second."""
        ticket = self.new_ticket()
        told: float | None = None
        while True:
            decision = self.acquire(model, ticket, tenant=tenant, tokens=tokens)
            if decision.go:
                return ticket
            if told is None or abs(decision.wait_s - told) > 1.0:
                told = decision.wait_s
                on_wait(decision)
            if should_stop():
                self.leave(model, ticket)
                return None
            try:
                sleep(_poll_s(decision, self.limit(model)))
            except StreamStopped:  # the run was stopped while it waited
                self.leave(model, ticket)
                return None


def _poll_s(decision: Decision, limit: ModelLimit) -> float:
    if decision.position < limit.rps:  # a head: come back when capacity frees up
        return min(max(decision.wait_s, HEAD_POLL_S), 1.0)
    near, far = QUEUE_POLL_S
    return near if decision.position < 4 * limit.rps else far
