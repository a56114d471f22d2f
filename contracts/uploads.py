"""Where images uploaded over HTTP are kept, for the API (which writes them) and the workers (which
read them): `QVQ_UPLOAD_URL` is `s3://bucket/prefix` (every worker can read it) or a local directory
(a single host). Jobs reference an upload as `upload://<id>`; the id is bound to the uploading tenant
in the store (`qvq_uploads`), checked when a job names it, and the object is deleted after
`QVQ_UPLOAD_TTL_S`.
"""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from contracts.settings import Settings

DEFAULT_DIR_NAME = "qvq-uploads"
#: The name every stored upload has (`uuid4().hex`); nothing else in the location is ever touched.
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")


class UploadStorage:
    def __init__(self, settings: Settings, *, directory: str | Path | None = None) -> None:
        self.settings = settings
        url = str(directory) if directory is not None else settings.upload_url
        self.bucket = self.prefix = ""
        self.directory: Path | None = None
        if url.startswith("s3://"):
            self.bucket, _, prefix = url[5:].partition("/")
            self.prefix = prefix.strip("/")
        else:
            self.directory = Path(url or Path(tempfile.gettempdir()) / DEFAULT_DIR_NAME).resolve()
        self._s3: Any = None

    @property
    def description(self) -> str:
        return str(self.directory) if self.directory is not None else f"s3://{self.bucket}/{self.prefix}"

    def location(self, upload_id: str) -> str:
        """The object a worker reads for `upload://<upload_id>`: an s3:// reference or a file path."""
        if self.directory is not None:
            return str(self.directory / upload_id)
        return f"s3://{self.bucket}/{self.prefix + '/' if self.prefix else ''}{upload_id}"

    def put(self, upload_id: str, data: bytes, content_type: str) -> None:
        if self.directory is not None:
            self.directory.mkdir(parents=True, exist_ok=True)
            (self.directory / upload_id).write_bytes(data)
            return
        self._client().put_object(Bucket=self.bucket, Key=self._key(upload_id), Body=data, ContentType=content_type)

    def delete(self, upload_id: str) -> None:
        if self.directory is not None:
            (self.directory / upload_id).unlink(missing_ok=True)
            return
        self._client().delete_object(Bucket=self.bucket, Key=self._key(upload_id))

    def stored_ids(self, older_than_s: float) -> Iterator[str]:
        """The ids of the uploads kept here longer than `older_than_s` (the sweeper's candidates for orphans)."""
        cutoff = time.time() - older_than_s
        if self.directory is not None:
            if not self.directory.is_dir():
                return
            for path in self.directory.iterdir():
                if UPLOAD_ID.fullmatch(path.name) and path.stat().st_mtime < cutoff:
                    yield path.name
            return
        prefix = f"{self.prefix}/" if self.prefix else ""
        for page in self._client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            for item in page.get("Contents", ()):
                name = item["Key"][len(prefix):]
                if UPLOAD_ID.fullmatch(name) and item["LastModified"].timestamp() < cutoff:
                    yield name

    def _key(self, upload_id: str) -> str:
        return f"{self.prefix}/{upload_id}" if self.prefix else upload_id

    def _client(self) -> Any:
        if self._s3 is None:
            import boto3
            from botocore.config import Config

            self._s3 = boto3.session.Session().client(
                "s3", endpoint_url=self.settings.s3_endpoint_url or None,
                config=Config(connect_timeout=10, read_timeout=30, retries={"mode": "standard"}))
        return self._s3
