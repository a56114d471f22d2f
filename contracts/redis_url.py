"""What a Redis URL names: one server, or a master found through Redis Sentinel (no I/O here; the clients
are built in contracts/redis_clients.py).

Accepted forms, for REDIS_URL and CELERY_BROKER_URL alike:

    redis://[[user]:password@]host[:port][/db]            one server (also rediss:// and unix://)
    redis+sentinel://[[user]:password@]h1[:26379],h2[:26379],h3[:26379]/<master name>[/<db>][?sentinel_password=...]
    sentinel://[[user]:password@]h1:26379;sentinel://h2:26379;...[/<db>]?master_name=<master name>
                                                          Celery's own Sentinel form, the master name in the query

The user and password are the master's; `sentinel_password` (when the sentinels ask for one) is the
sentinels'. Whatever the form, the broker, the event bus, the limiter, the leases and the sweep all go
through the master the sentinels name, and follow it when they promote a replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

PLAIN_SCHEMES = ("redis://", "rediss://", "unix://")
SENTINEL_SCHEME = "redis+sentinel://"
CELERY_SENTINEL_SCHEME = "sentinel://"
REDIS_SCHEMES = (*PLAIN_SCHEMES, SENTINEL_SCHEME, CELERY_SENTINEL_SCHEME)
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A master known by name to a set of sentinels."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None

    def celery_url(self) -> str:
        """The same target in Celery's form (kombu reads the master's credentials and db from the first part)."""
        auth = ""
        if self.username or self.password:
            auth = f"{self.username or ''}:{self.password or ''}@"
        return ";".join(f"{CELERY_SENTINEL_SCHEME}{auth}{_host(host)}:{port}/{self.db}" for host, port in self.sentinels)

    def celery_options(self) -> dict[str, object]:
        """The broker transport options kombu's Sentinel channel needs besides the URL."""
        options: dict[str, object] = {"master_name": self.master}
        if self.sentinel_password:
            options["sentinel_kwargs"] = {"password": self.sentinel_password}
        return options


def is_redis(url: str) -> bool:
    return url.startswith(REDIS_SCHEMES)


def sentinel_target(url: str) -> SentinelTarget | None:
    """The Sentinel target a URL names, or None for one server; ValueError (one line) for a bad URL."""
    if url.startswith(SENTINEL_SCHEME):
        return _parse_sentinel(url)
    if url.startswith(CELERY_SENTINEL_SCHEME):
        return _parse_celery_sentinel(url)
    return None


def check_redis_url(raw: str) -> str:
    """A settings parser: the URL unchanged, or ValueError naming what is wrong (never the password)."""
    url = raw.strip()
    if not is_redis(url):
        raise ValueError("expected redis://host:6379/0, rediss://, unix://, "
                         "redis+sentinel://h1:26379,h2:26379/<master> or Celery's sentinel:// form")
    sentinel_target(url)
    return url


def check_broker_url(raw: str) -> str:
    """CELERY_BROKER_URL: a Redis URL is checked as REDIS_URL is; other brokers are Celery's to judge."""
    url = raw.strip()
    if url.startswith(REDIS_SCHEMES):
        sentinel_target(url)
    return url


def _parse_sentinel(url: str) -> SentinelTarget:
    split = urlsplit(url)
    userinfo, _, hosts = split.netloc.rpartition("@")
    username, password = _credentials(userinfo)
    sentinels = tuple(_address(part) for part in hosts.split(",") if part)
    path = [part for part in split.path.split("/") if part]
    if not sentinels or not path:
        raise ValueError("a redis+sentinel:// URL names its sentinels and master: "
                         "redis+sentinel://h1:26379,h2:26379/<master>[/<db>]")
    query = parse_qs(split.query)
    return SentinelTarget(sentinels, unquote(path[0]), _db(path[1] if len(path) > 1 else "0"),
                          username, password, _one(query, "sentinel_password"))


def _parse_celery_sentinel(url: str) -> SentinelTarget:
    base, _, query_text = url.partition("?")
    query = parse_qs(query_text)
    master = _one(query, "master_name")
    if not master:
        raise ValueError("a sentinel:// broker URL names its master: add ?master_name=<master> "
                         "(or use REDIS_URL=redis+sentinel://h1:26379,h2:26379/<master>)")
    sentinels, db, username, password = [], 0, None, None
    for part in base.split(";"):
        if not part.strip():
            continue
        split = urlsplit(part.strip())
        userinfo, _, host = split.netloc.rpartition("@")
        if userinfo and username is None and password is None:
            username, password = _credentials(userinfo)
        sentinels.append(_address(host))
        if split.path.strip("/"):
            db = _db(split.path.strip("/"))
    if not sentinels:
        raise ValueError("a sentinel:// broker URL names at least one sentinel")
    return SentinelTarget(tuple(sentinels), master, db, username, password, _one(query, "sentinel_password"))


def _credentials(userinfo: str) -> tuple[str | None, str | None]:
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if has_password and password else None)


def _address(part: str) -> tuple[str, int]:
    split = urlsplit(f"//{part.strip()}")
    try:
        port = split.port or SENTINEL_PORT
    except ValueError:
        raise ValueError("a sentinel's port is not a number") from None
    if not split.hostname:
        raise ValueError("a sentinel address has no host")
    return split.hostname, port


def _db(text: str) -> int:
    if not text.isdigit():
        raise ValueError("the database number after the master's name must be a number")
    return int(text)


def _one(query: dict[str, list[str]], name: str) -> str | None:
    values = query.get(name)
    return values[-1] if values else None


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
