"""Uploads as the producer sees them: an image stored for one tenant, referenced as `upload://<id>` in that
tenant's jobs, deleted after QVQ_UPLOAD_TTL_S (contracts/uploads.py keeps the bytes, the store the row)."""

from __future__ import annotations

import itertools
import unicodedata
import uuid

from contracts.errors import ApiCallError, RequestError
from contracts.image_formats import MIME, sniff_format
from contracts.logging import get_logger
from contracts.settings import Settings
from contracts.store import Store, UploadRecord
from contracts.tenants import Principal
from contracts.uploads import UploadStorage

log = get_logger(__name__)
MAX_FILENAME_CHARS = 200
#: A file kept this long without a row is an orphan (an upload whose row never came, or outlived it).
ORPHAN_AGE_S = 300
ORPHAN_BATCH = 500


def clean_filename(filename: str | None) -> str:
    """The name an upload is shown under: its last path part, printable characters only, at most 200."""
    name = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch if ch.isprintable() and unicodedata.category(ch) != "Cs" else "_" for ch in name).strip()
    return name[:MAX_FILENAME_CHARS] or "upload"


class UploadService:
    def __init__(self, settings: Settings, store: Store, storage: UploadStorage) -> None:
        self.settings = settings
        self.store = store
        self.storage = storage

    def add(self, principal: Principal, data: bytes, filename: str | None, field: str) -> UploadRecord:
        """Keep one image for the principal's tenant; refused when empty, too large or not an image."""
        limit = self.settings.max_image_bytes
        name = clean_filename(filename)
        if len(data) > limit:
            raise ApiCallError(f"{name}: larger than {limit / 1048576:g} MB", code="image.too_large", status=413,
                               field=field)
        if not data:
            raise RequestError(f"{name}: empty file", field=field)
        format_ = sniff_format(data)
        if format_ is None:
            raise RequestError(f"{name}: not an image this service accepts (BMP, JPEG, PNG, TIFF, WEBP, HEIC)",
                               field=field, code="image.unsupported_format")
        upload_id = uuid.uuid4().hex
        # The row first: a file is never kept without one (a failed insert stores nothing).
        record = self.store.add_upload(upload_id, tenant=principal.tenant, filename=name, format_=format_,
                                       size=len(data), ttl_s=self.settings.upload_ttl_s)
        try:
            self.storage.put(upload_id, data, MIME[format_])
        except BaseException:
            self.store.delete_upload(upload_id)
            raise
        return record

    def delete(self, upload_id: str) -> None:
        self.storage.delete(upload_id)
        self.store.delete_upload(upload_id)

    def delete_expired(self) -> int:
        """Delete the uploads past their retention, then the stored files without a row; returns how many."""
        expired = self.store.expired_uploads()
        for upload in expired:
            self.delete(upload.id)
        if expired:
            log.info("uploads.expired_deleted", count=len(expired))
        return len(expired) + self.delete_orphans()

    def delete_orphans(self, older_than_s: float = ORPHAN_AGE_S) -> int:
        """Delete stored files that have no row (kept longer than `older_than_s`); returns how many."""
        deleted = 0
        candidates = self.storage.stored_ids(older_than_s)
        while batch := list(itertools.islice(candidates, ORPHAN_BATCH)):
            for upload_id in set(batch) - self.store.known_upload_ids(batch):
                self.storage.delete(upload_id)
                deleted += 1
        if deleted:
            log.info("uploads.orphans_deleted", count=deleted)
        return deleted
