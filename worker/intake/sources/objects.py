"""s3:// and oss:// references: boto3, against AWS or S3_ENDPOINT_URL (MinIO...) for s3://, and Alibaba
OSS's S3-compatible endpoint (OSS_ENDPOINT_URL, virtual-hosted addressing, OSS_* credentials) for oss://.

botocore's errors are translated here: NoSuchKey/NoSuchBucket/404 -> image.not_found; AccessDenied, bad
credentials, a bucket not in QVQ_ALLOWED_BUCKETS -> image.access_denied; an object over the size limit
(refused before download when the store tells its size) -> image.too_large; 5xx, throttling, timeouts
-> image.fetch_failed (retryable). The body has a total deadline (DOWNLOAD_TIME_FACTOR fetch timeouts,
deadlines.py): a store that drips bytes is cut off. The head is bounded by botocore's connect and read
timeouts per read, and its tries (retry.OBJECT_STORE_ATTEMPTS).
"""

from __future__ import annotations

import re
import socket
import threading
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from urllib3.exceptions import ProtocolError

from contracts import retry
from contracts.errors import ImageError
from contracts.settings import Settings
from worker.intake.sources.common import check_size, scheme_of
from worker.intake.sources.deadlines import DEADLINES, DOWNLOAD_TIME_FACTOR, Deadline

POOL_CONNECTIONS = 50
READ_CHUNK = 256 * 1024
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"}
_DENIED_CODES = {
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidSecurity", "ExpiredToken", "InvalidToken", "Forbidden",
    "SecondLevelDomainForbidden", "UserDisable", "401", "Unauthorized",
}
_OSS_REGION = re.compile(r"(?:^|\.)oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")


def oss_region(settings: Settings) -> str | None:
    """settings.oss_region, else parsed from an endpoint like https://s3.oss-cn-hangzhou.aliyuncs.com."""
    if settings.oss_region:
        return settings.oss_region
    host = urlsplit(settings.oss_endpoint_url).hostname or ""
    match = _OSS_REGION.search(host)
    return match.group(1) if match else None


class ObjectSource:
    """Reads objects of s3:// and oss:// buckets; one boto3 client per scheme, made on first use."""

    schemes: tuple[str, ...] = ("s3", "oss")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_bytes = settings.max_image_bytes
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def fetch(self, ref: str, *, allowed: bool = False) -> bytes:
        """`allowed`: the bucket is ours (uploads), whatever QVQ_ALLOWED_BUCKETS says."""
        scheme = scheme_of(ref)
        bucket, key = self._bucket_key(scheme, ref, allowed=allowed)
        client = self._client(scheme, ref)
        budget_s = self.settings.fetch_timeout_s * DOWNLOAD_TIME_FACTOR
        deadline = DEADLINES.start(budget_s)
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                deadline.attach(_socket_of(body))
                size = int(response.get("ContentLength") or 0)
                if size > self.max_bytes:
                    raise ImageError(f"object is {size:,} bytes, over the limit of {self.max_bytes:,}; not downloaded",
                                     code="image.too_large", ref=ref)
                data = self._read(body, deadline, budget_s, ref)
            finally:
                body.close()
        except ClientError as exc:
            raise _map_client_error(exc, bucket, key, ref) from exc
        except NoCredentialsError as exc:
            raise ImageError("no credentials to read the bucket", code="image.access_denied", ref=ref) from exc
        except (BotoCoreError, ProtocolError, OSError) as exc:
            if deadline.fired:
                raise ImageError(f"download not finished after {budget_s:g}s", code="image.fetch_failed",
                                 ref=ref) from exc
            raise ImageError(f"object store unreachable ({type(exc).__name__}: {exc})", code="image.fetch_failed",
                             ref=ref) from exc
        finally:
            deadline.cancel()
        check_size(len(data), self.max_bytes, ref)
        return data

    def _read(self, body: Any, deadline: Deadline, budget_s: float, ref: str) -> bytes:
        """The body, at most max_bytes + 1, within the download's total deadline (a store that drips
        bytes is cut off by the watchdog shutting the socket down)."""
        chunks: list[bytes] = []
        total = 0
        while total <= self.max_bytes:
            chunk = body.read(min(READ_CHUNK, self.max_bytes + 1 - total))
            if deadline.fired:
                raise ImageError(f"download not finished after {budget_s:g}s", code="image.fetch_failed", ref=ref)
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def presigned_url(self, ref: str, expires_s: int) -> str | None:
        """A time-limited GET URL for an s3:// or oss:// object (QVQ_IMAGE_DELIVERY=presigned); None
        for other references, which are always sent inline."""
        scheme = scheme_of(ref)
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
            "retries": {"mode": "standard", "total_max_attempts": retry.OBJECT_STORE_ATTEMPTS}, "max_pool_connections": POOL_CONNECTIONS,
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


def _socket_of(body: Any) -> socket.socket | None:
    """The socket a botocore StreamingBody reads from: its urllib3 connection's, or, when the connection
    let go of it (a response that closes the connection), the one under http.client's response file."""
    raw = getattr(body, "_raw_stream", None)
    candidates = (getattr(getattr(raw, "connection", None), "sock", None),
                  getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None))
    return next((sock for sock in candidates if isinstance(sock, socket.socket)), None)


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
