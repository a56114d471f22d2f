"""Tenants and API keys (README, "Tenants and access").

`QVQ_API_KEYS` is a comma-separated list: `tenant:key` entries are tenant keys, a bare `key` is an
admin key. A request's tenant comes from its key, never from its body:

    keys = KeyRing.parse(settings.api_keys)
    principal = keys.authenticate(token)      # None for an unknown key
    principal.tenant                          # "acme" for a tenant key, None for an admin key

Keys are held as SHA-256 digests and every one is compared (in constant time) on each request, so
neither the comparison nor its duration tells which key, or how much of one, matched.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from contracts.errors import ConfigError

#: Task ids, tenant names and conversation ids: URL- and header-safe, bounded.
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._:-]{0,127}")
SAFE_ID_RULE = "1-128 characters of A-Z a-z 0-9 . _ : - (not starting with . : or -)"
MIN_KEY_CHARS = 16


def is_safe_id(value: str) -> bool:
    return SAFE_ID.fullmatch(value) is not None


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: one tenant, or every tenant (an admin key, or an API without keys)."""

    tenant: str | None

    @property
    def is_admin(self) -> bool:
        return self.tenant is None

    def may_see(self, tenant: str | None) -> bool:
        """Whether a row of `tenant` exists for this principal (others answer like a missing row)."""
        return self.is_admin or tenant == self.tenant


ADMIN = Principal(tenant=None)


class KeyRing:
    def __init__(self, entries: list[tuple[bytes, Principal]]) -> None:
        self._entries = entries

    @property
    def enabled(self) -> bool:
        return bool(self._entries)

    @classmethod
    def parse(cls, raw_entries: tuple[str, ...] | list[str]) -> KeyRing:
        """Parse QVQ_API_KEYS entries; ConfigError (never showing a key) when one is malformed."""
        entries: list[tuple[bytes, Principal]] = []
        seen: set[bytes] = set()
        for index, raw in enumerate(raw_entries, start=1):
            tenant, sep, key = raw.strip().partition(":")
            if not sep:
                tenant, key = "", tenant
            where = f"QVQ_API_KEYS entry {index}"
            if sep and not is_safe_id(tenant):
                raise ConfigError(f"{where}: the tenant name must be {SAFE_ID_RULE}")
            if len(key) < MIN_KEY_CHARS:
                raise ConfigError(f"{where}: the key must be at least {MIN_KEY_CHARS} characters")
            digest = _digest(key)
            if digest in seen:
                raise ConfigError(f"{where}: the same key is listed twice")
            seen.add(digest)
            entries.append((digest, Principal(tenant=tenant or None)))
        return cls(entries)

    def authenticate(self, supplied: str) -> Principal | None:
        """The principal of a key, or None; every key is compared, each in constant time."""
        digest = _digest(supplied)
        found: Principal | None = None
        for expected, principal in self._entries:
            if hmac.compare_digest(expected, digest):
                found = principal
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
