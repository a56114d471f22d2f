"""https:// references (and http://, for local testing): fetched through the SSRF guard (contracts/ssrf.py).

The host is resolved once, every address is checked, and the connection goes to the checked address
(with the original Host header and TLS server name). Redirects are followed by hand and each hop is
checked again; the size is capped while reading (identity encoding: no gzip bomb is inflated). Each try
has a total deadline of DOWNLOAD_TIME_FACTOR fetch timeouts, head and body: a server that drips bytes
(even in its headers, where every read stays under the read timeout) is cut off by shutting the
request's socket down from the one watchdog thread (deadlines.py), which wakes the blocked read. Each
request gets its own connection (no keep-alive), so the watchdog always knows its socket. Tries follow
contracts/retry.FETCH.

    404/410 -> image.not_found; 401/403 and refused addresses -> image.access_denied; 5xx, 408, 429,
    timeouts and connection errors -> image.fetch_failed (retryable); a bad certificate -> not retryable.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Collection
from urllib.parse import urljoin

import httpx

from contracts.deadlines import DEADLINES, DOWNLOAD_TIME_FACTOR
from contracts.errors import ImageError, UnsafeURL
from contracts.retry import FETCH
from contracts.settings import Settings
from contracts.ssrf import Pinned, Resolver, UrlGuard, guarded_client

MAX_REDIRECTS = 5
POOL_CONNECTIONS = 50
USER_AGENT = "qvq-queue-image-fetcher/0.1"
#: how each refusal of the SSRF guard reads as an image error
_UNSAFE_CODES = {"invalid": "image.not_found", "refused": "image.access_denied", "not_found": "image.not_found",
                 "unresolved": "image.fetch_failed"}


class WebSource:
    """``resolver`` and ``trusted`` (tests) go to the SSRF guard; ``ssl_context`` replaces the default
    certificate store (e.g. a private CA)."""

    schemes: tuple[str, ...] = ("https", "http")

    def __init__(self, settings: Settings, *, resolver: Resolver | None = None,
                 trusted: Collection[tuple[str, int]] = (), ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.max_bytes = settings.max_image_bytes
        self._guard = UrlGuard(allow_private=settings.allow_private_urls, resolver=resolver, trusted=trusted)
        self._http = guarded_client(
            timeout=httpx.Timeout(settings.fetch_timeout_s),
            verify=ssl_context if ssl_context is not None else True,
            limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=0),
            # identity: the size cap then counts the bytes on the wire, and no gzip bomb is inflated
            headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        )

    def close(self) -> None:
        self._http.close()

    def fetch(self, ref: str) -> bytes:
        url = ref
        for _ in range(MAX_REDIRECTS + 1):
            location = FETCH.call(self._get_once, url, ref)
            if isinstance(location, bytes):
                return location
            url = location
        raise ImageError(f"more than {MAX_REDIRECTS} redirects", code="image.fetch_failed", retryable=False, ref=ref)

    def _pin(self, url: str, ref: str) -> Pinned:
        try:
            return self._guard.pin(url)
        except UnsafeURL as exc:
            raise ImageError(exc.message, code=_UNSAFE_CODES[exc.reason], ref=ref) from exc

    def _get_once(self, url: str, ref: str) -> bytes | str:
        pinned = self._pin(url, ref)
        budget_s = self.settings.fetch_timeout_s * DOWNLOAD_TIME_FACTOR
        deadline = DEADLINES.start(budget_s)
        try:
            with self._http.stream("GET", pinned.url, headers=pinned.headers,
                                   extensions={**pinned.extensions, "trace": deadline.trace}) as response:
                if response.is_redirect:
                    location = str(response.headers.get("location") or "")
                    if not location:
                        raise ImageError(f"redirect without a Location from {url}", code="image.fetch_failed",
                                         retryable=False, ref=ref)
                    return urljoin(url, location)
                _check_status(response.status_code, url, ref)
                return self._read_capped(response, ref)
        except httpx.TimeoutException as exc:
            raise ImageError(f"timed out fetching {url} ({type(exc).__name__})", code="image.fetch_failed",
                             ref=ref) from exc
        except httpx.TransportError as exc:
            if deadline.fired:
                raise ImageError(f"download not finished after {budget_s:g}s", code="image.fetch_failed",
                                 ref=ref) from exc
            tls = "CERTIFICATE_VERIFY_FAILED" in str(exc)  # a bad certificate will not heal on retry
            raise ImageError(f"cannot fetch {url} ({type(exc).__name__}: {exc})", code="image.fetch_failed",
                             retryable=not tls, ref=ref) from exc
        finally:
            deadline.cancel()

    def _read_capped(self, response: httpx.Response, ref: str) -> bytes:
        declared = response.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            raise ImageError(f"Content-Length {int(declared):,} is over the limit of {self.max_bytes:,}; not downloaded",
                             code="image.too_large", ref=ref)
        chunks: list[bytes] = []
        total = 0
        budget_s = self.settings.fetch_timeout_s * DOWNLOAD_TIME_FACTOR
        deadline = time.monotonic() + budget_s
        for chunk in response.iter_bytes():
            if time.monotonic() > deadline:  # a server dripping bytes never trips the read timeout
                raise ImageError(f"download not finished after {budget_s:g}s", code="image.fetch_failed", ref=ref)
            total += len(chunk)
            if total > self.max_bytes:
                raise ImageError(f"more than {self.max_bytes:,} bytes; download stopped", code="image.too_large",
                                 ref=ref)
            chunks.append(chunk)
        return b"".join(chunks)





def _check_status(status: int, url: str, ref: str) -> None:
    if status < 300:
        return
    if status in (404, 410):
        raise ImageError(f"HTTP {status} from {url}", code="image.not_found", ref=ref)
    if status in (401, 403):
        raise ImageError(f"HTTP {status} from {url}: access denied", code="image.access_denied", ref=ref)
    retryable = status >= 500 or status in (408, 429)
    raise ImageError(f"HTTP {status} from {url}", code="image.fetch_failed", retryable=retryable, ref=ref)
