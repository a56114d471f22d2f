"""One signed POST of a task's terminal event to the job's callback_url (contracts/webhook.py signs it).

`attempt` is the one implementation: a coroutine for the worker's event loop (worker/loop.py), so a
receiver that answers slowly, or trickles its reply, holds no thread. Its whole try (the DNS lookup, the
connection, the request and the reply) has a total deadline, QVQ_CALLBACK_TIMEOUT_S: a receiver that
sends one byte every few seconds is cut off at the deadline, not kept alive by each byte.

The URL goes through the SSRF guard (contracts/ssrf.py) like an image URL: the host is resolved once and
every address checked, the POST goes to the checked address, no proxy from the environment, no redirect
followed. Durable deliveries (deliveries.py) make their tries through `attempt`; `post_once` and
`deliver` (the quick tries of contracts/retry.CALLBACK, never raising) run it for a caller without a loop.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import httpx

from contracts.errors import UnsafeURL
from contracts.logging import get_logger
from contracts.redaction import shown_url
from contracts.retry import CALLBACK, RETRY_OUTCOME
from contracts.ssrf import UrlGuard, guarded_async_client
from contracts.webhook import SIGNATURE_HEADER, sign

log = get_logger(__name__)
TIMEOUT_S = 10.0  # QVQ_CALLBACK_TIMEOUT_S's default: one try, in total
CONNECT_TIMEOUT_S = 5.0
MAX_RESPONSE_BYTES = 64 * 1024  # a receiver's reply is read this far, then dropped


class Outcome(StrEnum):
    DELIVERED = "delivered"  # 2xx
    RETRY = RETRY_OUTCOME  # any other status, a timeout, a connection or DNS failure: try again later
    GONE = "gone"  # 410: the receiver asks us to stop
    REFUSED = "refused"  # the URL is invalid or reaches an address we must not (SSRF guard): never sent


def deliver(url: str, event: dict[str, Any], *, secret: str, allow_private: bool,
            transport: httpx.AsyncBaseTransport | None = None, guard: UrlGuard | None = None,
            timeout_s: float = TIMEOUT_S) -> bool:
    """True when the receiver answered 2xx; never raises. ``guard`` (tests) replaces allow_private."""
    guard = guard or make_guard(allow_private)
    try:
        outcome = CALLBACK.call(post_once, url, event, secret=secret, guard=guard, transport=transport,
                                timeout_s=timeout_s)
    except Exception as exc:  # the task's result is already persisted: a bug here must not fail it
        log.error("callback.error", url=shown_url(url), error=f"{type(exc).__name__}: {exc}")
        return False
    if outcome is not Outcome.DELIVERED:
        log.warning("callback.undelivered", url=shown_url(url), outcome=str(outcome))
    return outcome is Outcome.DELIVERED


def make_guard(allow_private: bool) -> UrlGuard:
    """The guard for callback URLs: plain http is allowed (the body is signed), private addresses are not."""
    return UrlGuard(allow_private=allow_private, https_only=False)


def make_client(transport: httpx.AsyncBaseTransport | None = None) -> httpx.AsyncClient:
    """The callbacks' client (one per loop); the total deadline is `attempt`'s, these are its parts."""
    return guarded_async_client(timeout=httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S), transport=transport,
                                limits=httpx.Limits(max_connections=None, max_keepalive_connections=20))


@dataclass(frozen=True)
class Attempt:
    """One try: what to do next, the receiver's status (None when nothing was answered), why it failed."""

    outcome: Outcome
    status_code: int | None = None
    error: str | None = None


def post_once(url: str, event: dict[str, Any], *, secret: str, guard: UrlGuard,
              transport: httpx.AsyncBaseTransport | None = None, timeout_s: float = TIMEOUT_S) -> Outcome:
    """One try, for a caller without an event loop: what to do next; never raises httpx errors."""
    async def once() -> Outcome:
        async with make_client(transport) as client:
            return (await attempt(url, event, secret=secret, guard=guard, client=client,
                                  timeout_s=timeout_s)).outcome

    return asyncio.run(once())


async def attempt(url: str, event: dict[str, Any], *, secret: str, guard: UrlGuard, client: httpx.AsyncClient,
                  timeout_s: float = TIMEOUT_S) -> Attempt:
    """One signed POST of the event to the address the guard checked, within `timeout_s` in all."""
    try:
        async with asyncio.timeout(timeout_s):
            return await _attempt(url, event, secret, guard, client)
    except TimeoutError:
        log.warning("callback.failed", url=shown_url(url), error=f"no full answer within {timeout_s:g} s")
        return Attempt(Outcome.RETRY, error=f"timeout ({timeout_s:g} s)")


async def _attempt(url: str, event: dict[str, Any], secret: str, guard: UrlGuard,
                   client: httpx.AsyncClient) -> Attempt:
    try:
        pinned = await asyncio.to_thread(guard.pin, url, credentials=False)  # DNS blocks: not on the loop
    except UnsafeURL as exc:
        retry = exc.reason in ("unresolved", "not_found")  # DNS may answer later; a bad address will not
        log.warning("callback.failed" if retry else "callback.refused", url=shown_url(url), reason=exc.reason,
                    error=exc.message)
        return Attempt(Outcome.RETRY if retry else Outcome.REFUSED, error=exc.message)
    body = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    try:
        async with client.stream("POST", pinned.url, content=body, headers={**_headers(event, body, secret),
                                 **pinned.headers}, extensions=pinned.extensions) as response:
            await _drain(response)
    except httpx.HTTPError as exc:
        log.warning("callback.failed", url=shown_url(url), error=f"{type(exc).__name__}: {exc}")
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


async def _drain(response: httpx.Response) -> None:
    if response.is_stream_consumed:  # a reply already held in memory (an in-process transport)
        return
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read >= MAX_RESPONSE_BYTES:
            break


def _outcome(url: str, status: int) -> Outcome:
    if 200 <= status < 300:
        log.info("callback.delivered", url=shown_url(url), status=status)
        return Outcome.DELIVERED
    if status == 410:
        log.warning("callback.gone", url=shown_url(url), status=status)
        return Outcome.GONE
    log.warning("callback.failed", url=shown_url(url), status=status)
    return Outcome.RETRY
