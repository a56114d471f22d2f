"""Fetching image references: s3://, oss://, https:// (http:// for local testing), file:// and local paths.

Every third-party error (botocore, httpx, OS) is translated here into an ImageError:

    image.not_found        404, NoSuchKey, NoSuchBucket, a missing file, an unknown host
    image.access_denied    401/403, AccessDenied, bad credentials, a bucket not allowed, local files
                           disabled, an address that is private/loopback/link-local (SSRF guard)
    image.too_large        over settings.max_image_bytes (refused before download when the size is known)
    image.fetch_failed     5xx, throttling, timeouts, connection errors, after a few retries (retryable)

URLs go through the SSRF guard (contracts/ssrf.py): the host is resolved once, every address is
checked, and the connection goes to the checked address (with the original Host header and TLS server
name). Redirects are followed by hand and each hop is checked again. Retries follow contracts/retry.FETCH.
"""

from __future__ import annotations

import re
import ssl
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

from contracts.errors import ImageError
from contracts.job import UPLOAD_REF
from contracts.retry import FETCH
from contracts.settings import Settings
from contracts.ssrf import Pinned, Resolver, UnsafeURL, UrlGuard, guarded_client
from contracts.uploads import UploadStorage

MAX_REDIRECTS = 5
S3_ATTEMPTS = 3  # botocore standard retry mode: 3 attempts in all
POOL_CONNECTIONS = 50
DOWNLOAD_TIME_FACTOR = 3  # one download may take at most this many fetch timeouts in all
USER_AGENT = "qvq-queue-image-fetcher/0.1"

_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"}
_DENIED_CODES = {
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidSecurity", "ExpiredToken", "InvalidToken", "Forbidden",
    "SecondLevelDomainForbidden", "UserDisable", "401", "Unauthorized",
}
_OSS_REGION = re.compile(r"(?:^|\.)oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")
#: how each refusal of the SSRF guard reads as an image error
_UNSAFE_CODES = {"invalid": "image.not_found", "refused": "image.access_denied", "not_found": "image.not_found",
                 "unresolved": "image.fetch_failed"}


def oss_region(settings: Settings) -> str | None:
    """settings.oss_region, else parsed from an endpoint like https://s3.oss-cn-hangzhou.aliyuncs.com."""
    if settings.oss_region:
        return settings.oss_region
    host = urlsplit(settings.oss_endpoint_url).hostname or ""
    match = _OSS_REGION.search(host)
    return match.group(1) if match else None


class ImageFetcher:
    """Fetches the bytes of one image reference; thread-safe, built once per worker process.

    ``resolver``, ``trusted`` and ``ssl_context`` exist for tests: ``resolver`` and ``trusted`` go to
    the SSRF guard (contracts/ssrf.UrlGuard); ``ssl_context`` replaces the default certificate store
    (e.g. a private CA).
    """

    def __init__(self, settings: Settings, *, resolver: Resolver | None = None,
                 trusted: Collection[tuple[str, int]] = (), ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.max_bytes = settings.max_image_bytes
        self._uploads = UploadStorage(settings)
        self._guard = UrlGuard(allow_private=settings.allow_private_urls, resolver=resolver, trusted=trusted)
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}
        self._http = guarded_client(
            timeout=httpx.Timeout(settings.fetch_timeout_s),
            verify=ssl_context if ssl_context is not None else True,
            limits=httpx.Limits(max_connections=POOL_CONNECTIONS, max_keepalive_connections=POOL_CONNECTIONS),
            # identity: the size cap then counts the bytes on the wire, and no gzip bomb is inflated
            headers={"User-Agent": USER_AGENT, "Accept": "image/*", "Accept-Encoding": "identity"},
        )

    def close(self) -> None:
        self._http.close()
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def fetch(self, ref: str) -> bytes:
        scheme = ref.split("://", 1)[0].lower() if "://" in ref else ""
        if scheme in ("s3", "oss"):
            return self._fetch_object(scheme, ref)
        if scheme in ("https", "http"):
            return self._fetch_url(ref)
        if scheme in ("file", ""):
            return self._fetch_file(ref)
        if scheme == "upload":
            return self._fetch_upload(ref)
        raise ImageError(f"unsupported reference scheme {scheme}://; use s3://, oss://, https:// or a local path",
                         code="image.access_denied", ref=ref)

    # -- upload:// (images uploaded over HTTP, kept where QVQ_UPLOAD_URL says) -----------------
    def _fetch_upload(self, ref: str) -> bytes:
        match = UPLOAD_REF.fullmatch(ref)
        if match is None:
            raise ImageError("not an upload reference", code="image.not_found", ref=ref)
        location = self._uploads.location(match.group(1))
        if location.startswith("s3://"):
            return self._fetch_object("s3", location, allowed=True)
        try:
            with open(location, "rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except FileNotFoundError as exc:
            raise ImageError("the upload is gone (expired, or QVQ_UPLOAD_URL differs between the API and "
                             "this worker)", code="image.not_found", ref=ref) from exc
        self._check_read_size(len(data), ref)
        return data

    # -- local files ---------------------------------------------------------------------------
    def _fetch_file(self, ref: str) -> bytes:
        if not self.settings.allow_local_files:
            raise ImageError("local files are not allowed on this worker (set QVQ_ALLOW_LOCAL_FILES=1 to allow)",
                             code="image.access_denied", ref=ref)
        if ref.lower().startswith("file://"):
            parts = urlsplit(ref)
            if parts.netloc not in ("", "localhost"):
                raise ImageError(f"file URL names a remote host {parts.netloc!r}", code="image.access_denied",
                                 ref=ref)
            path = Path(unquote(parts.path))
        else:
            path = Path(ref).expanduser()
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ImageError("not a regular file", code="image.not_found", ref=ref)
            if size > self.max_bytes:
                raise ImageError(f"{size:,} bytes, over the limit of {self.max_bytes:,}", code="image.too_large",
                                 ref=ref)
            with path.open("rb") as fh:
                data = fh.read(self.max_bytes + 1)
        except FileNotFoundError as exc:
            raise ImageError("no such file", code="image.not_found", ref=ref) from exc
        except PermissionError as exc:
            raise ImageError("permission denied reading the file", code="image.access_denied", ref=ref) from exc
        except OSError as exc:
            raise ImageError(f"cannot read the file ({exc.strerror or exc})", code="image.not_found", ref=ref) from exc
        self._check_read_size(len(data), ref)
        return data

    def _check_read_size(self, n: int, ref: str) -> None:
        if n > self.max_bytes:
            raise ImageError(f"more than {self.max_bytes:,} bytes", code="image.too_large", ref=ref)

    # -- s3:// and oss:// ----------------------------------------------------------------------
    def presigned_url(self, ref: str, expires_s: int) -> str | None:
        """A time-limited GET URL for an s3:// or oss:// object (QVQ_IMAGE_DELIVERY=presigned); None
        for other references, which are always sent inline."""
        scheme = ref.split("://", 1)[0].lower() if "://" in ref else ""
        if scheme not in ("s3", "oss"):
            return None
        bucket, key = self._bucket_key(scheme, ref)
        url = self._client(scheme, ref).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)
        return str(url)

    def _client(self, scheme: str, ref: str) -> Any:
        with self._lock:
            client = self._clients.get(scheme)
            if client is None:
                client = self._clients[scheme] = self._make_client(scheme, ref)
            return client

    def _make_client(self, scheme: str, ref: str) -> Any:
        timeouts: dict[str, Any] = {
            "connect_timeout": self.settings.fetch_timeout_s, "read_timeout": self.settings.fetch_timeout_s,
            "retries": {"mode": "standard", "total_max_attempts": S3_ATTEMPTS}, "max_pool_connections": POOL_CONNECTIONS,
        }
        session = boto3.session.Session()
        if scheme == "s3":
            return session.client("s3", endpoint_url=self.settings.s3_endpoint_url or None, config=Config(**timeouts))
        if not (self.settings.oss_endpoint_url and self.settings.oss_access_key_id):
            raise ImageError("oss:// references need OSS_ENDPOINT_URL, OSS_ACCESS_KEY_ID and OSS_ACCESS_KEY_SECRET",
                             code="image.access_denied", ref=ref)
        return session.client(
            "s3", endpoint_url=self.settings.oss_endpoint_url, region_name=oss_region(self.settings),
            aws_access_key_id=self.settings.oss_access_key_id,
            aws_secret_access_key=self.settings.oss_access_key_secret,
            config=Config(
                s3={"addressing_style": "virtual"}, signature_version="s3v4",
                request_checksum_calculation="when_required", response_checksum_validation="when_required",
                **timeouts,
            ),
        )

    def _bucket_key(self, scheme: str, ref: str, *, allowed: bool = False) -> tuple[str, str]:
        rest = ref.split("://", 1)[1]
        bucket, _, key = rest.partition("/")
        if not bucket or not key:
            raise ImageError(f"expected {scheme}://bucket/key", code="image.not_found", ref=ref)
        permitted = self.settings.allowed_buckets
        if not allowed and permitted and bucket not in permitted and f"{scheme}://{bucket}" not in permitted:
            raise ImageError(f"bucket {bucket!r} is not in QVQ_ALLOWED_BUCKETS", code="image.access_denied", ref=ref)
        return bucket, key

    def _fetch_object(self, scheme: str, ref: str, *, allowed: bool = False) -> bytes:
        """`allowed`: the bucket is ours (uploads), whatever QVQ_ALLOWED_BUCKETS says."""
        bucket, key = self._bucket_key(scheme, ref, allowed=allowed)
        client = self._client(scheme, ref)
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                size = int(response.get("ContentLength") or 0)
                if size > self.max_bytes:
                    raise ImageError(f"object is {size:,} bytes, over the limit of {self.max_bytes:,}; not downloaded",
                                     code="image.too_large", ref=ref)
                data: bytes = body.read(self.max_bytes + 1)
            finally:
                body.close()
        except ClientError as exc:
            raise _map_client_error(exc, bucket, key, ref) from exc
        except NoCredentialsError as exc:
            raise ImageError("no credentials to read the bucket", code="image.access_denied", ref=ref) from exc
        except BotoCoreError as exc:
            raise ImageError(f"object store unreachable ({type(exc).__name__}: {exc})", code="image.fetch_failed",
                             ref=ref) from exc
        self._check_read_size(len(data), ref)
        return data

    # -- https:// ------------------------------------------------------------------------------
    def _fetch_url(self, ref: str) -> bytes:
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
        try:
            with self._http.stream("GET", pinned.url, headers=pinned.headers,
                                   extensions=pinned.extensions) as response:
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
            tls = "CERTIFICATE_VERIFY_FAILED" in str(exc)  # a bad certificate will not heal on retry
            raise ImageError(f"cannot fetch {url} ({type(exc).__name__}: {exc})", code="image.fetch_failed",
                             retryable=not tls, ref=ref) from exc

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


def _map_client_error(exc: ClientError, bucket: str, key: str, ref: str) -> ImageError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
    where = f"bucket {bucket!r}, key {key!r}"
    if code in _NOT_FOUND_CODES or status == 404:
        what = "no such bucket" if code == "NoSuchBucket" else "no such object"
        return ImageError(f"{what} ({where}; {code or status})", code="image.not_found", ref=ref)
    if code in _DENIED_CODES or status in (401, 403):
        return ImageError(f"access denied ({where}; {code or status})", code="image.access_denied", ref=ref)
    retryable = status >= 500 or status in (408, 429) or "Throttl" in code or "SlowDown" in code
    return ImageError(f"object store error ({where}; {code or status}: {error.get('Message', '')})",
                      code="image.fetch_failed", retryable=retryable, ref=ref)
