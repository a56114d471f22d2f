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

from typing import Any

from botocore.exceptions import ClientError, NoCredentialsError

from contracts.deadlines import DEADLINES, DOWNLOAD_TIME_FACTOR, Deadline
from contracts.errors import ImageError
from contracts.object_store import (
    OBJECT_SCHEMES,
    OBJECT_STORE_ERRORS,
    ObjectClients,
    map_client_error,
    socket_of,
)
from contracts.settings import Settings
from worker.intake.sources.common import check_size, scheme_of

READ_CHUNK = 256 * 1024


class ObjectSource:
    """Reads objects of s3:// and oss:// buckets, through the shared clients (contracts/object_store.py)."""

    schemes: tuple[str, ...] = OBJECT_SCHEMES

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.max_bytes = settings.max_image_bytes
        self.clients = ObjectClients(settings)

    def close(self) -> None:
        self.clients.close()

    def fetch(self, ref: str, *, allowed: bool = False) -> bytes:
        """`allowed`: the bucket is ours (uploads), whatever QVQ_ALLOWED_BUCKETS says."""
        scheme = scheme_of(ref)
        bucket, key = self.clients.bucket_key(ref, allowed=allowed)
        client = self.clients.client(scheme, ref)
        budget_s = self.settings.fetch_timeout_s * DOWNLOAD_TIME_FACTOR
        deadline = DEADLINES.start(budget_s)
        try:
            response = client.get_object(Bucket=bucket, Key=key)
            body = response["Body"]
            try:
                deadline.attach(socket_of(body))
                size = int(response.get("ContentLength") or 0)
                if size > self.max_bytes:
                    raise ImageError(f"object is {size:,} bytes, over the limit of {self.max_bytes:,}; not downloaded",
                                     code="image.too_large", ref=ref)
                data = self._read(body, deadline, budget_s, ref)
            finally:
                body.close()
        except ClientError as exc:
            raise map_client_error(exc, bucket, key, ref) from exc
        except NoCredentialsError as exc:
            raise ImageError("no credentials to read the bucket", code="image.access_denied", ref=ref) from exc
        except OBJECT_STORE_ERRORS as exc:
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
        if scheme not in OBJECT_SCHEMES:
            return None
        bucket, key = self.clients.bucket_key(ref)
        url = self.clients.client(scheme, ref).generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=expires_s)
        return str(url)
