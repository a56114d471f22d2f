"""One signed POST of a task's terminal event to the job's callback_url (contracts/webhook.py signs it).

Durable deliveries (deliveries.py) make their tries through `attempt`. The URL goes through the SSRF guard (contracts/ssrf.py) like an image URL: the
host is resolved once and every address checked, the POST goes to the checked address, no proxy from
the environment, no redirect followed. `post_once` makes one try and says what to do next; `deliver`
makes the tries of contracts/retry.CALLBACK and never raises. A caller making its own tries (a Celery
task) calls `post_once` with `make_guard(...)` and `make_client()`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any
from urllib.parse import urlsplit

import httpx

from contracts.errors import UnsafeURL
from contracts.logging import get_logger
from contracts.retry import CALLBACK, RETRY_OUTCOME
from contracts.ssrf import UrlGuard, guarded_client
from contracts.webhook import SIGNATURE_HEADER, sign

log = get_logger(__name__)
TIMEOUT = httpx.Timeout(10.0, connect=5.0)
MAX_RESPONSE_BYTES = 64 * 1024  # a receiver's reply is read this far, then dropped


class Outcome(StrEnum):
    DELIVERED = "delivered"  # 2xx
    RETRY = RETRY_OUTCOME  # any other status, a timeout, a connection or DNS failure: try again later
    GONE = "gone"  # 410: the receiver asks us to stop
    REFUSED = "refused"  # the URL is invalid or reaches an address we must not (SSRF guard): never sent


def deliver(url: str, event: dict[str, Any], *, secret: str, allow_private: bool,
            client: httpx.Client | None = None, guard: UrlGuard | None = None) -> bool:
    """True when the receiver answered 2xx; never raises. ``guard`` (tests) replaces allow_private."""
    guard = guard or make_guard(allow_private)
    http = client or make_client()
    try:
        outcome = CALLBACK.call(post_once, url, event, secret=secret, guard=guard, client=http)
    except Exception as exc:  # the task's result is already persisted: a bug here must not fail it
        log.error("callback.error", url=_shown(url), error=f"{type(exc).__name__}: {exc}")
        return False
    finally:
        if client is None:
            http.close()
    if outcome is not Outcome.DELIVERED:
        log.warning("callback.undelivered", url=_shown(url), outcome=str(outcome))
    return outcome is Outcome.DELIVERED


def make_guard(allow_private: bool) -> UrlGuard:
    """The guard for callback URLs: plain http is allowed (the body is signed), private addresses are not."""
    return UrlGuard(allow_private=allow_private, https_only=False)


def make_client() -> httpx.Client:
    return guarded_client(timeout=TIMEOUT)


@dataclass(frozen=True)
class Attempt:
    """One try: what to do next, the receiver's status (None when nothing was answered), why it failed."""

    outcome: Outcome
    status_code: int | None = None
    error: str | None = None


def post_once(url: str, event: dict[str, Any], *, secret: str, guard: UrlGuard, client: httpx.Client) -> Outcome:
    """One signed POST of the event, to the address the guard checked; never raises httpx errors."""
    return attempt(url, event, secret=secret, guard=guard, client=client).outcome


def attempt(url: str, event: dict[str, Any], *, secret: str, guard: UrlGuard, client: httpx.Client) -> Attempt:
    """As post_once, telling also the status code and the error (for a delivery's record)."""
    try:
        pinned = guard.pin(url, credentials=False)
    except UnsafeURL as exc:
        retry = exc.reason in ("unresolved", "not_found")  # DNS may answer later; a bad address will not
        log.warning("callback.failed" if retry else "callback.refused", url=_shown(url), reason=exc.reason,
                    error=exc.message)
        return Attempt(Outcome.RETRY if retry else Outcome.REFUSED, error=exc.message)
    body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        with client.stream("POST", pinned.url, content=body, headers={**_headers(event, body, secret),
                           **pinned.headers}, extensions=pinned.extensions) as response:
            _drain(response)
    except httpx.HTTPError as exc:
        log.warning("callback.failed", url=_shown(url), error=f"{type(exc).__name__}: {exc}")
        return Attempt(Outcome.RETRY, error=type(exc).__name__)
    outcome = _outcome(url, response.status_code)
    error = None if outcome is Outcome.DELIVERED else f"HTTP {response.status_code}"
    return Attempt(outcome, response.status_code, error)


def _headers(event: dict[str, Any], body: bytes, secret: str) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "Content-Type": "application/json",
        # bytes: a task id may be any non-space Unicode, which a str header value could not carry
        "X-Qvq-Event": str(event.get("type", "")).encode(),
        "X-Qvq-Task-Id": str(event.get("task_id", "")).encode(),
    }
    if event.get("event_id"):  # receivers dedupe by it (worker/deliveries.py)
        headers["X-Qvq-Event-Id"] = str(event["event_id"]).encode()
    if secret:
        headers[SIGNATURE_HEADER] = sign(body, secret)  # signed at each try: a fresh timestamp
    return headers


def _drain(response: httpx.Response) -> None:
    if response.is_stream_consumed:  # a reply already held in memory (an in-process transport)
        return
    read = 0
    for chunk in response.iter_raw():
        read += len(chunk)
        if read >= MAX_RESPONSE_BYTES:
            break


def _outcome(url: str, status: int) -> Outcome:
    if 200 <= status < 300:
        log.info("callback.delivered", url=_shown(url), status=status)
        return Outcome.DELIVERED
    if status == 410:
        log.warning("callback.gone", url=_shown(url), status=status)
        return Outcome.GONE
    log.warning("callback.failed", url=_shown(url), status=status)
    return Outcome.RETRY


def _shown(url: str) -> str:
    """The URL for a log line: no credentials, query or fragment (they may carry a receiver's token)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid URL>"
    return f"{parts.scheme}://{host}{port}{parts.path}"[:200]
