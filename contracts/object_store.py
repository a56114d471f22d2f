"""s3:// and oss:// buckets, for everyone who reads them: the boto3 clients (AWS or S3_ENDPOINT_URL for
s3://; Alibaba OSS's S3-compatible endpoint, virtual-hosted addressing and the OSS_* credentials for
oss://), the bucket allow-list, botocore's errors as ImageError, and the two reads a batch needs before
anything runs: a paginated listing of a prefix and a ranged read of an object's first bytes.

The worker's image fetch (worker/intake/sources/objects.py) and the producer's batches
(producer/service/batches.py) both go through here, so a bucket is reached and refused one way.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, ParamValidationError
from urllib3.exceptions import ProtocolError

from contracts import retry
from contracts.deadlines import DEADLINES, DOWNLOAD_TIME_FACTOR
from contracts.errors import ImageError
from contracts.settings import Settings

OBJECT_SCHEMES = ("s3", "oss")
POOL_CONNECTIONS = 50
LIST_PAGE = 1000  # keys per listing request (the S3 maximum)
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404", "NoSuchVersion"}
_DENIED_CODES = {
    "AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
    "AccountProblem", "InvalidSecurity", "ExpiredToken", "InvalidToken", "Forbidden",
    "SecondLevelDomainForbidden", "UserDisable", "401", "Unauthorized",
}
_OSS_REGION = re.compile(r"(?:^|\.)oss-([a-z0-9-]+?)(?:-internal)?\.aliyuncs\.com$")
OBJECT_STORE_ERRORS = (BotoCoreError, ProtocolError, OSError)


@dataclass(frozen=True)
class ListedObject:
    """One object of a listing: its reference, size and version (the ETag: it changes with the content)."""

    ref: str
    size: int
    version: str


def oss_region(settings: Settings) -> str | None:
    """settings.oss_region, else parsed from an endpoint like https://s3.oss-cn-hangzhou.aliyuncs.com."""
    if settings.oss_region:
        return settings.oss_region
    host = urlsplit(settings.oss_endpoint_url).hostname or ""
    match = _OSS_REGION.search(host)
    return match.group(1) if match else None


def scheme_of(ref: str) -> str:
    """The reference's scheme, lower case; "" for a bare path."""
    return ref.split("://", 1)[0].lower() if "://" in ref else ""


class ObjectClients:
    """One boto3 client per scheme, made on first use (thread-safe: boto3 clients are)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._clients: dict[str, Any] = {}

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    def client(self, scheme: str, ref: str) -> Any:
        with self._lock:
            client = self._clients.get(scheme)
            if client is None:
                client = self._clients[scheme] = self._make_client(scheme, ref)
            return client

    def _make_client(self, scheme: str, ref: str) -> Any:
        timeouts: dict[str, Any] = {
            "connect_timeout": self.settings.fetch_timeout_s, "read_timeout": self.settings.fetch_timeout_s,
            "retries": {"mode": "standard", "total_max_attempts": retry.OBJECT_STORE_ATTEMPTS},
            "max_pool_connections": POOL_CONNECTIONS,
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

    def bucket_key(self, ref: str, *, allowed: bool = False, prefix: bool = False) -> tuple[str, str]:
        """(bucket, key) of an s3:// or oss:// reference, when QVQ_ALLOWED_BUCKETS permits the bucket
        (`allowed`: the bucket is ours, whatever it says). `prefix`: an empty key is the whole bucket."""
        scheme = scheme_of(ref)
        rest = ref.split("://", 1)[1] if "://" in ref else ""
        bucket, _, key = rest.partition("/")
        if not bucket or (not key and not prefix):
            raise ImageError(f"expected {scheme}://bucket/key", code="image.not_found", ref=ref)
        permitted = self.settings.allowed_buckets
        if not allowed and permitted and bucket not in permitted and f"{scheme}://{bucket}" not in permitted:
            raise ImageError(f"bucket {bucket!r} is not in QVQ_ALLOWED_BUCKETS", code="image.access_denied", ref=ref)
        return bucket, key

    # -- the reads of a batch ----------------------------------------------------------------------
    def list_objects(self, prefix_ref: str, suffix: str = "") -> Iterator[ListedObject]:
        """The objects under `s3://bucket/prefix` (or oss://), in key order, a page of LIST_PAGE at a
        time (only one page is held at once); `suffix` keeps keys ending with it (case-insensitive).
        Keys ending in "/" (folder markers) are skipped."""
        scheme = scheme_of(prefix_ref)
        bucket, prefix = self.bucket_key(prefix_ref, prefix=True)
        client = self.client(scheme, prefix_ref)
        wanted = suffix.lower()
        try:
            pages = client.get_paginator("list_objects_v2").paginate(
                Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": LIST_PAGE})
            for page in pages:
                for item in page.get("Contents") or ():
                    key = str(item["Key"])
                    if key.endswith("/") or not key.lower().endswith(wanted):
                        continue
                    yield ListedObject(f"{scheme}://{bucket}/{key}", int(item.get("Size") or 0),
                                       str(item.get("ETag") or "").strip('"'))
        except ClientError as exc:
            raise map_client_error(exc, bucket, prefix, prefix_ref) from exc
        except NoCredentialsError as exc:
            raise ImageError("no credentials to list the bucket", code="image.access_denied", ref=prefix_ref) from exc
        except ParamValidationError as exc:
            raise ImageError("not a valid bucket name or prefix", code="image.not_found", ref=prefix_ref) from exc
        except OBJECT_STORE_ERRORS as exc:
            raise ImageError(f"object store unreachable ({type(exc).__name__})", code="image.fetch_failed",
                             ref=prefix_ref) from exc

    def read_head(self, ref: str, size: int) -> tuple[bytes, int]:
        """The first `size` bytes of an object (one ranged GET, never the whole object) and its full size."""
        scheme = scheme_of(ref)
        bucket, key = self.bucket_key(ref)
        budget_s = self.settings.fetch_timeout_s * DOWNLOAD_TIME_FACTOR
        deadline = DEADLINES.start(budget_s)  # a store that drips bytes is cut off, as for a fetch
        try:
            response = self.client(scheme, ref).get_object(Bucket=bucket, Key=key, Range=f"bytes=0-{size - 1}")
            body = response["Body"]
            try:
                deadline.attach(socket_of(body))
                data = body.read(size)
            finally:
                body.close()
            if deadline.fired:
                raise ImageError(f"header not read after {budget_s:g}s", code="image.fetch_failed", ref=ref)
        except ClientError as exc:
            raise map_client_error(exc, bucket, key, ref) from exc
        except NoCredentialsError as exc:
            raise ImageError("no credentials to read the bucket", code="image.access_denied", ref=ref) from exc
        except OBJECT_STORE_ERRORS as exc:
            what = f"header not read after {budget_s:g}s" if deadline.fired else \
                f"object store unreachable ({type(exc).__name__})"
            raise ImageError(what, code="image.fetch_failed", ref=ref) from exc
        finally:
            deadline.cancel()
        total = str(response.get("ContentRange") or "").rpartition("/")[2]
        return data, int(total) if total.isdigit() else int(response.get("ContentLength") or len(data))


def socket_of(body: Any) -> socket.socket | None:
    """The socket a botocore StreamingBody reads from: its urllib3 connection's, or, when the connection
    let go of it (a response that closes the connection), the one under http.client's response file."""
    raw = getattr(body, "_raw_stream", None)
    candidates = (getattr(getattr(raw, "connection", None), "sock", None),
                  getattr(getattr(getattr(getattr(raw, "_fp", None), "fp", None), "raw", None), "_sock", None))
    return next((sock for sock in candidates if isinstance(sock, socket.socket)), None)


def map_client_error(exc: ClientError, bucket: str, key: str, ref: str) -> ImageError:
    """botocore's error as ours: not found, access denied, or a fetch failure (retryable when the store
    was busy or broken)."""
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
