"""Flow control's shared contract: model and tenant limits (QVQ_MODEL_LIMITS, QVQ_TENANT_LIMITS), and the
read-only views of the limiter's state that the API and the CLI show (its keys are in contracts/keys.py).

The worker enforces (worker/flow/); the producer only reads.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

import redis

from contracts import keys
from contracts.catalog import MODELS

#: Per second: at most ceil(limit/60). The limiter's windows are longer by QVQ_FLOW_MARGIN_MS, which
#: absorbs the jitter between our grant and the service's clock, so the service never sees a burst we did not.
SECOND_WINDOW_MS = 1_000
MINUTE_WINDOW_MS = 60_000


@dataclass(frozen=True)
class ModelLimit:
    rpm: int
    tpm: int

    @property
    def rps(self) -> int:
        return max(1, math.ceil(self.rpm / 60))

    @property
    def tps(self) -> int:
        return max(1, math.ceil(self.tpm / 60))


@dataclass(frozen=True)
class TenantLimit:
    concurrency: int | None = None
    rpm: int | None = None
    daily_budget_cny: Decimal | None = None
    monthly_budget_cny: Decimal | None = None


#: The vendor's published account limits (qvq-api.md); qvq-plus shares qvq-max's table cells.
DEFAULT_MODEL_LIMITS: dict[str, ModelLimit] = {
    "qvq-max": ModelLimit(rpm=60, tpm=100_000),
    "qvq-plus": ModelLimit(rpm=60, tpm=100_000),
}
NO_TENANT_LIMIT = TenantLimit()


def parse_model_limits(raw: str) -> dict[str, ModelLimit]:
    """QVQ_MODEL_LIMITS: {"family": {"rpm": N, "tpm": N}}, merged over the defaults; ValueError if bad."""
    families = {info.family for info in MODELS.values()}
    data = _json_object(raw)
    limits = dict(DEFAULT_MODEL_LIMITS)
    for family, entry in data.items():
        if family not in families:
            raise ValueError(f"unknown model family {family!r} (one of {', '.join(sorted(families))})")
        entry = _entry(family, entry, {"rpm", "tpm"})
        base = limits[family]
        limits[family] = ModelLimit(rpm=_positive_int(family, "rpm", entry.get("rpm", base.rpm)),
                                    tpm=_positive_int(family, "tpm", entry.get("tpm", base.tpm)))
    return limits


def parse_tenant_limits(raw: str) -> dict[str, TenantLimit]:
    """QVQ_TENANT_LIMITS: {"tenant" | "*": {"concurrency", "rpm", "daily_budget_cny", "monthly_budget_cny"}}."""
    out: dict[str, TenantLimit] = {}
    for tenant, entry in _json_object(raw).items():
        entry = _entry(tenant, entry, {"concurrency", "rpm", "daily_budget_cny", "monthly_budget_cny"})
        out[tenant] = TenantLimit(
            concurrency=_optional(tenant, "concurrency", entry, _positive_int),
            rpm=_optional(tenant, "rpm", entry, _positive_int),
            daily_budget_cny=_optional(tenant, "daily_budget_cny", entry, _money),
            monthly_budget_cny=_optional(tenant, "monthly_budget_cny", entry, _money),
        )
    return out


def tenant_limit(limits: dict[str, TenantLimit], tenant: str | None) -> TenantLimit:
    """The tenant's own entry, else "*", else no limit."""
    return limits.get(tenant or "", limits.get("*", NO_TENANT_LIMIT))


def _json_object(raw: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not valid JSON ({exc.msg} at {exc.pos})") from None
    if not isinstance(data, dict):
        raise ValueError("expected a JSON object")
    return data


def _entry(name: str, entry: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(entry, dict):
        raise ValueError(f"{name}: expected an object")
    unknown = set(entry) - allowed
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})")
    return entry


def _optional(name: str, key: str, entry: dict[str, Any], parse: Any) -> Any:
    return None if entry.get(key) is None else parse(name, key, entry[key])


def _positive_int(name: str, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}.{key}: expected a positive integer")
    return value


def _money(name: str, key: str, value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"{name}.{key}: expected an amount in CNY")
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        raise ValueError(f"{name}.{key}: expected an amount in CNY") from None
    if not amount.is_finite() or amount < 0:
        raise ValueError(f"{name}.{key}: expected a non-negative amount")
    return amount


# -- read-only views -----------------------------------------------------------------------------
def read_waiting(client: redis.Redis, task_id: str) -> dict[str, Any] | None:
    """Why the task is held back and for about how long, or None."""
    return parse_waiting(client.get(keys.waiting_key(task_id)))


def held_back(client: redis.Redis, task_ids: list[str]) -> set[str]:
    """Which of these tasks flow control holds back (one round trip)."""
    if not task_ids:
        return set()
    raws = client.mget([keys.waiting_key(task_id) for task_id in task_ids])
    return {task_id for task_id, raw in zip(task_ids, raws, strict=True) if parse_waiting(raw) is not None}


def parse_waiting(raw: Any) -> dict[str, Any] | None:
    """A waiting marker as stored, or None when absent or unreadable."""
    if not raw:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, TypeError):
        return None
    return value if isinstance(value, dict) else None


def snapshot(client: redis.Redis, limits: dict[str, ModelLimit]) -> list[dict[str, Any]]:
    """Per family: requests and tokens in the current second and minute against their limits, waiters,
    and the seconds left of a 429's tightening."""
    seconds, micros = client.time()
    now_ms = int(seconds) * 1000 + int(micros) // 1000
    rows = []
    for family, limit in sorted(limits.items()):
        tokens = client.zrangebyscore(keys.tokens_key(family), now_ms - 60_000, "+inf")
        tokens_1s = client.zrangebyscore(keys.tokens_key(family), now_ms - 1_000, "+inf")
        pttl = int(client.pttl(keys.tightened_key(family)))
        rows.append({
            "family": family,
            "requests_1s": int(client.zcount(keys.requests_key(family), now_ms - 1_000, "+inf")), "rps": limit.rps,
            "requests_60s": int(client.zcount(keys.requests_key(family), now_ms - 60_000, "+inf")), "rpm": limit.rpm,
            "tokens_1s": _token_sum(tokens_1s), "tps": limit.tps,
            "tokens_60s": _token_sum(tokens), "tpm": limit.tpm,
            "waiting": int(client.zcard(keys.waiters_key(family))),
            "tightened_s": round(pttl / 1000, 1) if pttl > 0 else 0.0,
        })
    return rows


def _token_sum(members: list[Any]) -> int:
    total = 0
    for member in members:
        text = member.decode() if isinstance(member, bytes) else str(member)
        total += int(text.rsplit(":", 1)[1])
    return total
