"""POST a task's terminal event to the job's callback_url, signed (contracts/webhook.py).

Best effort with a few retries: the result is already persisted and published, so a receiver that
is down loses nothing it cannot fetch again. The URL gets the same address checks as image URLs.
"""

from __future__ import annotations

import ipaddress
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from contracts.logging import get_logger
from contracts.webhook import SIGNATURE_HEADER, sign
from worker.fetch import is_public_address, resolve_host

log = get_logger(__name__)
ATTEMPTS = 3
TIMEOUT_S = 10.0
BACKOFF_S = (0.5, 2.0)


def deliver(url: str, event: dict[str, Any], *, secret: str, allow_private: bool,
            client: httpx.Client | None = None) -> bool:
    """True when the receiver answered 2xx; never raises."""
    if not allow_private and not _public(url):
        log.warning("callback.refused", url=url, reason="private, loopback or unresolvable address")
        return False
    body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    headers = {"Content-Type": "application/json", "X-Qvq-Event": event["type"], "X-Qvq-Task-Id": event["task_id"]}
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)
    http = client or httpx.Client(timeout=TIMEOUT_S, follow_redirects=False)
    try:
        for attempt in range(1, ATTEMPTS + 1):
            if _post_once(http, url, body, headers, attempt):
                return True
            if attempt < ATTEMPTS:
                time.sleep(BACKOFF_S[min(attempt - 1, len(BACKOFF_S) - 1)])
        return False
    finally:
        if client is None:
            http.close()


def _post_once(http: httpx.Client, url: str, body: bytes, headers: dict[str, str], attempt: int) -> bool:
    try:
        response = http.post(url, content=body, headers=headers)
    except httpx.HTTPError as exc:
        log.warning("callback.failed", url=url, attempt=attempt, error=str(exc))
        return False
    if response.is_success:
        log.info("callback.delivered", url=url, status=response.status_code)
        return True
    log.warning("callback.failed", url=url, attempt=attempt, status=response.status_code)
    return False


def _public(url: str) -> bool:
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    try:
        addresses = resolve_host(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except OSError:
        return False
    return bool(addresses) and all(is_public_address(ipaddress.ip_address(a.split("%")[0])) for a in addresses)
