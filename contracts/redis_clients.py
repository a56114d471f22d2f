"""Every Redis client of every process is built here, from REDIS_URL or CELERY_BROKER_URL: one server, or
the master a set of sentinels names (contracts/redis_url.py reads the URL).

Behind Sentinel, a client asks the sentinels for the master before it connects, and again after a
connection error. While the sentinels promote a replica, a command is tried again on the schedule
REDIS_FAILOVER (contracts/backoff.py): up to about 17 s, the length of a failover with a down-after of a few
seconds (as managed services run it); past that, each caller's own retry policy (contracts/retry.py) takes over.
The Celery broker is configured from the same URL (`celery_broker`), so kombu follows the same master.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as asentinel
import redis.sentinel
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from contracts.backoff import REDIS_FAILOVER, REDIS_FAILOVER_TRIES
from contracts.redis_url import SentinelTarget, sentinel_target

#: Options of a sentinel's own connection (its answers are small and fast, or it is down).
SENTINEL_SOCKET_TIMEOUT_S = 2.0
_SENTINEL_ONLY_OPTIONS = ("socket_connect_timeout", "socket_timeout", "socket_keepalive")


def sync_client(url: str, **options: Any) -> redis.Redis:
    """A client of the server, or of the master, `url` names; `options` are redis-py connection options."""
    target = sentinel_target(url)
    if target is None:
        return redis.Redis.from_url(url, **options)
    manager = redis.sentinel.Sentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target, options))
    client: redis.Redis = manager.master_for(target.master, redis_class=redis.Redis,
                                             **_master_options(target, options))
    return client


def async_client(url: str, *, blocking_pool: bool = False, **options: Any) -> aioredis.Redis:
    """The asyncio client of `url`. `blocking_pool`: a caller waits for a free connection (up to the
    pool's `timeout`) rather than failing when all `max_connections` are busy."""
    target = sentinel_target(url)
    if target is None:
        if blocking_pool:
            return aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool.from_url(url, **options))
        return aioredis.Redis.from_url(url, **options)
    manager = asentinel.Sentinel(target.sentinels, sentinel_kwargs=_sentinel_options(target, options))
    pool_class = BlockingSentinelPool if blocking_pool else asentinel.SentinelConnectionPool
    client: aioredis.Redis = manager.master_for(target.master, redis_class=aioredis.Redis,
                                                connection_pool_class=pool_class,
                                                **_master_options(target, options, asyncio=True))
    return client


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """The broker URL and the extra transport options Celery needs for CELERY_BROKER_URL (or REDIS_URL)."""
    target = sentinel_target(url)
    if target is None:
        return url, {}
    return target.celery_url(), target.celery_options()


class BlockingSentinelPool(asentinel.SentinelConnectionPool, aioredis.BlockingConnectionPool):
    """A Sentinel-managed pool that makes callers wait for a free connection (as BlockingConnectionPool)."""


def _master_options(target: SentinelTarget, options: dict[str, Any], *, asyncio: bool = False) -> dict[str, Any]:
    merged = {"db": target.db, "username": target.username, "password": target.password,
              "retry": _failover_retry(AsyncRetry if asyncio else Retry),
              "retry_on_error": [RedisConnectionError, RedisTimeoutError],
              **options}
    return {key: value for key, value in merged.items() if value is not None}


def _sentinel_options(target: SentinelTarget, options: dict[str, Any]) -> dict[str, Any]:
    chosen = {key: options[key] for key in _SENTINEL_ONLY_OPTIONS if key in options}
    chosen.setdefault("socket_connect_timeout", SENTINEL_SOCKET_TIMEOUT_S)
    chosen.setdefault("socket_timeout", SENTINEL_SOCKET_TIMEOUT_S)
    if target.sentinel_password:
        chosen["password"] = target.sentinel_password
    return chosen


def _failover_retry(kind: type[Retry] | type[AsyncRetry]) -> Retry | AsyncRetry:
    return kind(ExponentialWithJitterBackoff(cap=REDIS_FAILOVER.max_s, base=REDIS_FAILOVER.base_s),
                 retries=REDIS_FAILOVER_TRIES)
